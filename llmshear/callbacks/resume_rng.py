"""Restore the random-number generators on resumption, which Composer skips for datasets that resume themselves."""

from __future__ import annotations

import logging

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import reproducibility

log = logging.getLogger(__name__)


class ResumeRNG(Callback):
    """Checkpoint the RNG states (every rank's) and restore them before the first batch of a resumed run.

    Composer 0.32.1 restores a checkpoint's RNG only at the start of an epoch, or while it replays the train
    dataloader up to the checkpointed batch. A dataset with its own ``state_dict`` (ours: see
    :mod:`llmshear.datasets.dynamic`) is not replayed, and an infinite one never starts a second epoch, so
    a resumed run would sample different hard-concrete masks than the uninterrupted run. This callback keeps
    the states in its own checkpoint entry and restores them after the first batch is fetched (the point the
    uninterrupted run was at when the checkpoint was written: between the checkpoint and the next batch
    nothing else draws random numbers).
    """

    def __init__(self):
        self._pending: list[dict] | None = None

    def state_dict(self) -> dict:
        # A collective: Composer builds the checkpoint state on every rank.
        return {"rng": reproducibility.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state["rng"]

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self._pending is not None:
            reproducibility.load_rng_state(self._pending)
            self._pending = None
            log.info("batch %d: random-number generators restored from the checkpoint", int(state.timestamp.batch))
