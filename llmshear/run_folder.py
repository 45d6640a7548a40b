"""The care of a run folder (``checkpoint.save_folder``): the lock that keeps two runs out of it, and recovery
after a kill at any moment (incomplete checkpoints set aside, never deleted; ``latest-rank0.pt`` pointed at the
newest complete one). The checkpoint files themselves are :mod:`llmshear.checkpoints`'.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from composer.utils import dist

from llmshear.checkpoints import (
    LATEST_CHECKPOINT,
    CheckpointError,
    checkpoint_batch,
    checkpoint_problem,
    checkpoints_in,
)
from llmshear.files import Lock, LockedError
from llmshear.ranks import together

log = logging.getLogger(__name__)

SET_ASIDE_DIR = "incomplete"
LOCK_FILE = "run.lock"


def set_aside(path: Path, why: str, into: str = SET_ASIDE_DIR) -> Path:
    """Move ``path`` into ``<its folder>/<into>/`` (a free name), log why, and return where it went."""
    directory = path.parent / into
    directory.mkdir(exist_ok=True)
    target, number = directory / path.name, 0
    while target.exists():
        number += 1
        target = directory / f"{path.name}.{number}"
    path.rename(target)
    log.warning("%s set aside as %s: %s", path, target, why)
    return target


def _point_latest(folder: Path, target: Path | None) -> None:
    """Make ``latest-rank0.pt`` a relative link to ``target`` (replaced atomically), or remove it (None)."""
    latest = folder / LATEST_CHECKPOINT
    if target is None:
        if latest.is_symlink():
            latest.unlink()
        return
    temporary = folder / f".{LATEST_CHECKPOINT}.{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target.name)
    os.replace(temporary, latest)


def recover(folder: str | os.PathLike) -> Path | None:
    """Make a run folder resumable after a kill at any moment, and return the checkpoint to resume from.

    Checkpoints are checked newest first (:func:`checkpoint_problem`, cheap): each incomplete one is moved into
    ``incomplete/`` (never deleted), so Composer neither loads it nor refuses to write its batch again; the
    newest complete one becomes ``latest-rank0.pt`` (a kill between a write and the link update leaves the
    link on the one before). Returns None when no complete checkpoint is left (the run starts afresh).
    """
    folder = Path(folder)
    latest = folder / LATEST_CHECKPOINT
    if latest.exists() and not latest.is_symlink():
        return latest  # not a link Composer wrote (e.g. a downloaded file): left as it is
    newest = None
    for _, path in reversed(checkpoints_in(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            newest = path
            break
        set_aside(path, problem)
    if newest is None and latest.is_symlink():
        log.warning("%s points to no complete checkpoint: removed (the run starts from batch 0)", latest)
    elif newest is not None and (not latest.is_symlink() or latest.resolve() != newest.resolve()):
        log.warning("%s now points to %s, the newest complete checkpoint", latest, newest.name)
    _point_latest(folder, newest)
    return newest


class RunLock(Lock):
    """``<save_folder>/run.lock``: one run at a time in a folder (a :class:`~llmshear.files.Lock`: a holder that
    is gone, by pid on this host or as an earlier incarnation of a requeued SLURM job, is taken over)."""

    def __init__(self, folder: str | os.PathLike):
        super().__init__(Path(folder) / LOCK_FILE)

    def acquire(self) -> None:
        """Take the lock (or a stale one).

        Raises:
            CheckpointError: another live run holds it; the message names the lock file and its holder.
        """
        try:
            super().acquire()
        except LockedError as err:
            raise CheckpointError(
                f"{self.path.parent} is in use by another run ({err}); wait for it to end or choose another "
                f"checkpoint.save_folder. If that process is gone, delete {self.path}") from None


def open_run_folder(folder: str | os.PathLike, autoresume: bool, max_batches: int,
                    plan: Callable[[], object] | None = None,
                    fetch: Callable[[object], None] | None = None) -> tuple[RunLock, int | None]:
    """Rank 0 takes the folder's lock and runs ``plan`` (e.g. which checkpoint of a remote run to download);
    every rank then runs ``fetch(plan's result)`` (its part of the download), waiting for the others without a
    collective timeout (:func:`llmshear.ranks.together`); then, with autoresume, rank 0 runs :func:`recover` and
    every rank gets the outcome (the other ranks wait for rank 0 here).

    Call it on every rank, after the process group is initialised and before the Trainer is built.

    Returns:
        The lock (held by rank 0: release it at the end), and the batch of the latest checkpoint when that
        already reached ``max_batches`` (the run is complete), else None.

    Raises:
        CheckpointError: on every rank, when the folder is locked by a live run or cannot be recovered, or
            ``plan`` or ``fetch`` raised one (or an OSError) on any rank.
    """
    lock = RunLock(folder)

    def acquire_and_plan() -> object:
        lock.acquire()
        return plan() if plan is not None else None

    def recover_and_check() -> int | None:
        newest = recover(folder) if autoresume else None
        batch = checkpoint_batch(newest.resolve()) if newest is not None else None
        return batch if batch is not None and batch >= max_batches else None

    planned = _on_rank_0(acquire_and_plan, lock)
    if fetch is not None and planned is not None:
        problems = together(partial(fetch, planned), f"downloading into {folder}")
        if problems:
            if dist.get_global_rank() == 0:
                lock.release()
            raise CheckpointError("; ".join(problems))
    return lock, _on_rank_0(recover_and_check, lock)


def _on_rank_0(work: Callable[[], object], lock: RunLock) -> object:
    """``work()`` on rank 0, its result on every rank; a CheckpointError or OSError (the lock released) raised on
    every rank as a CheckpointError."""
    outcome: list = [None, None]
    if dist.get_global_rank() == 0:
        try:
            outcome[1] = work()
        except (CheckpointError, OSError) as err:
            outcome[0] = str(err)
            lock.release()
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])
    return outcome[1]
