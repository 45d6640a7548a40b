"""Composer callbacks that care for the run folder during a run: ``checkpoint.keep`` counted across resumes, and
the ``checkpoint.remote`` mirror kept up to date (:mod:`llmshear.remote`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmshear.checkpoints import LATEST_CHECKPOINT, checkpoints_in
from llmshear.remote import Mirror, Remote, RemoteError

log = logging.getLogger(__name__)


class KeepAcrossResumes(Callback):
    """Make ``checkpoint.keep`` count the checkpoints written before a resume too.

    Composer's checkpoint saver rotates only the checkpoints its own process wrote; after each resume the older
    ones would stay forever. At ``fit_start`` rank 0 (the rank that deletes) hands the saver the checkpoints
    already in the folder up to the batch the run starts from, oldest first.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger
        saver = next((c for c in state.callbacks if isinstance(c, CheckpointSaver)), None)
        if saver is None or saver.saved_checkpoints or dist.get_global_rank() != 0:
            return
        start = int(state.timestamp.batch)
        # Composer records a sharded checkpoint by this rank's shard file and deletes the directory around it.
        saver.saved_checkpoints = [str(path / "__0_0.distcp") if path.is_dir() else str(path)
                                   for batch, path in checkpoints_in(self.folder) if batch <= start]


class MirrorRunFolder(Callback):
    """Keep ``checkpoint.remote`` a mirror of the run folder during the run (rank 0; see
    :class:`~llmshear.remote.Mirror`).

    Syncs when ``latest-rank0.pt`` has moved (a new checkpoint), at ``fit_end`` and at (the first) ``close``.
    Added after Composer's checkpoint saver, so at each event the checkpoint of that event is already written;
    one written after a sync goes out at the next. A failed upload is logged and retried at the next sync; ``train.py``
    syncs once more after the Trainer closed and reports a failure there (:func:`~llmshear.remote.mirror_run`).

    Args:
        folder: the run folder.
        uri: ``checkpoint.remote``.
    """

    def __init__(self, folder: str | os.PathLike, uri: str):
        self.folder, self.uri = Path(folder), uri
        self._mirror: Mirror | None = None
        self._latest: str | None = None
        self._closed = False

    def _sync(self) -> None:
        if dist.get_global_rank() != 0:
            return
        try:
            self._mirror = self._mirror or Mirror(self.folder, Remote(self.uri))
            self._mirror.sync()
        except RemoteError as err:
            log.warning("%s; retried at the next checkpoint and at the end", err)

    def _latest_target(self) -> str | None:
        latest = self.folder / LATEST_CHECKPOINT
        return os.readlink(latest) if latest.is_symlink() else None

    def fit_start(self, state: State, logger: Logger) -> None:
        del state, logger
        self._latest = self._latest_target()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        del state, logger
        target = self._latest_target()
        if target != self._latest:
            self._latest = target
            self._sync()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self.batch_checkpoint(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        del state, logger
        self._sync()

    def close(self, state: State, logger: Logger) -> None:
        del state, logger
        if not self._closed:  # Composer calls close again at the interpreter's exit
            self._closed = True
            self._sync()
