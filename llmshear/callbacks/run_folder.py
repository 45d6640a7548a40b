"""Composer callbacks that care for the run folder during a run: ``checkpoint.keep`` counted across resumes, and
the ``checkpoint.remote`` mirror kept up to date in the background (:mod:`llmshear.mirror`)."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmshear.checkpoints import CheckpointError, checkpoints_in
from llmshear.mirror import Mirror
from llmshear.remote import Remote, RemoteError

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
    """Keep ``checkpoint.remote`` a mirror of the run folder during the run, uploading in the background (every
    rank its part; see :class:`~llmshear.mirror.Mirror`).

    At each checkpoint event after a new checkpoint (Composer's saver runs before this callback), the files to
    upload are staged (hard links: a rotation cannot delete them under the upload) and handed to one upload
    thread, so training goes on while they upload. At most one upload is in flight: a new checkpoint whose
    predecessor is still uploading waits for it first (a slow store delays the run, it never loses a
    checkpoint). On a file system without hard links the upload runs in the training thread instead. At
    ``close`` the last upload is waited for; ``train.py`` then syncs once more on every rank, after the Trainer
    closed, and reports a failure there (:func:`llmshear.run.mirror`). A failed upload is logged and retried at
    the next checkpoint.

    Args:
        folder: the run folder.
        uri: ``checkpoint.remote``.
    """

    def __init__(self, folder: str | os.PathLike, uri: str):
        self.folder, self.uri = Path(folder), uri
        self._mirror: Mirror | None = None
        self._newest: Path | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future | None = None
        self._closed = False

    def mirror(self) -> Mirror:
        if self._mirror is None:
            self._mirror = Mirror(self.folder, Remote(self.uri), dist.get_global_rank(), dist.get_world_size())
        return self._mirror

    def _newest_checkpoint(self) -> Path | None:
        found = checkpoints_in(self.folder)
        return found[-1][1] if found else None

    def _upload(self, files) -> None:
        try:
            self.mirror().upload(files)
        except CheckpointError as err:  # a RemoteError, or a checkpoint's .metadata unreadable
            log.warning("%s; retried at the next checkpoint and at the end", err)

    def wait(self) -> None:
        """Until the upload in flight (if any) has ended."""
        if self._job is not None:
            started = time.monotonic()
            self._job.result()
            self._job = None
            waited = time.monotonic() - started
            if waited > 1:
                log.info("waited %.0f s for the previous checkpoint's upload to %s", waited, self.uri)

    def fit_start(self, state: State, logger: Logger) -> None:
        del state, logger
        self._newest = self._newest_checkpoint()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        del state, logger
        newest = self._newest_checkpoint()
        if newest == self._newest:
            return
        self._newest = newest
        self.wait()
        try:
            mirror = self.mirror()
            files = mirror.stage()
        except RemoteError as err:
            log.warning("%s; retried at the next checkpoint and at the end", err)
            return
        except OSError as err:
            log.warning("cannot stage %s's new files for a background upload (%s): uploading them in the training "
                        "thread", self.folder, err)
            self._upload([(name, self.folder / name, None) for name in mirror.pending()])
            return
        self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmshear-upload")
        self._job = self._pool.submit(self._upload, files)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self.batch_checkpoint(state, logger)

    def close(self, state: State, logger: Logger) -> None:
        del state, logger
        if not self._closed:  # Composer calls close again at the interpreter's exit
            self._closed = True
            self.wait()
            if self._pool is not None:
                self._pool.shutdown()
