"""Stop a run whose training loss stays NaN or infinite: Composer would train on to the end with garbage weights."""

from __future__ import annotations

import logging
import math

from composer.core import Callback, State
from composer.loggers import Logger

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite for ``train.max_nonfinite`` consecutive batches."""


class NonFiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` once the training loss has been non-finite for ``limit`` batches in a row.

    Reads ``state.total_loss_dict`` at ``batch_end``: Composer has already all-reduced it, so every rank sees
    the same values and stops at the same batch. One non-finite batch alone is logged as a warning (a run with
    dynamic loss scaling may skip one step and recover); a streak means the weights or the gates are already
    NaN and every later batch is wasted, so the run stops before the checkpoint of that batch is written.
    Batches are numbered as in ``metrics.jsonl`` (the first batch is 0).

    Args:
        limit: consecutive non-finite batches that stop the run (``train.max_nonfinite``), at least 1.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"train.max_nonfinite must be positive, got {limit}")
        self.limit = limit
        self.streak = 0
        self._seen: object = None

    def batch_end(self, state: State, logger: Logger) -> None:
        del logger
        losses = state.total_loss_dict
        if losses is self._seen:  # not updated this batch (a step skipped by the gradient scaler)
            return
        self._seen = losses
        bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
        if not bad:
            self.streak = 0
            return
        self.streak += 1
        batch = int(state.timestamp.batch) - 1
        log.warning("batch %d: non-finite training loss %s (%d of %d in a row allowed)", batch, bad,
                    self.streak, self.limit)
        if self.streak >= self.limit:
            first = batch - self.streak + 1
            raise NonFiniteLossError(
                f"the training loss was NaN or infinite for {self.streak} consecutive batches ({first} to {batch} "
                f"in metrics.jsonl; last: {bad}): run stopped (train.max_nonfinite={self.limit}). Checkpoints "
                f"already written are kept; those of batch {first} and later ('ba{first}' and up in the file name) "
                f"hold weights that gave a non-finite loss. Start again from an earlier one "
                f"(checkpoint.load_path) or from the start, with a lower optimizer.lr / optimizer.lag_lr.")

    def state_dict(self) -> dict:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.streak = int(state.get("streak", 0))
