"""One training run: ``train.py RECIPE.yaml [key=value ...]`` (see the repository's ``train.py``).

:func:`main` loads and validates the recipe (every problem at once, before any weight or data is read), then
:func:`run` locks the run folder (and, resuming, recovers it), builds the Composer Trainer and fits. At the end
the run folder holds the checkpoints, ``metrics.jsonl``, ``masks/`` (pruning runs) and ``proportions.json``
(the final domain proportions, which ``data.proportions_from`` of a later run reads).
"""

from __future__ import annotations

import logging
from functools import partial

from composer.utils import dist, get_device

from llmshear.builders import build_trainer
from llmshear.callbacks.nonfinite import NonFiniteLossError
from llmshear.callbacks.preemption import Preempted
from llmshear.checkpoints import CheckpointError
from llmshear.config import ConfigError, RunConfig, load
from llmshear.config.preflight import weight_problems
from llmshear.datasets.mds import ShardError
from llmshear.files import DiskError, disk_failure
from llmshear.mirror import Mirror, fetch_part, plan_fetch
from llmshear.ranks import together
from llmshear.remote import Remote, RemoteError
from llmshear.run_folder import open_run_folder
from llmshear.slurm import PREEMPTED_STATUS

log = logging.getLogger("train")

USAGE = "usage: train.py RECIPE.yaml [key=value ...]"


def run(cfg: RunConfig) -> None:
    """Lock (and, resuming, recover) the run folder, build everything and fit.

    With ``checkpoint.remote``, a resume whose folder holds no complete checkpoint first downloads the run (every
    rank its part: :func:`llmshear.mirror.plan_fetch`, :func:`llmshear.mirror.fetch_part`), and at the end the
    folder's mirror is brought up to date (:func:`mirror`).

    Raises:
        Preempted: a signal stopped the run after a checkpoint (mirrored with ``checkpoint.remote``);
        CheckpointError: the run folder is in use by another run (see :func:`llmshear.run_folder.open_run_folder`);
            :class:`~llmshear.remote.RemoteError`: ``checkpoint.remote`` cannot be read or written.
    """
    dist.initialize_dist(get_device(cfg.train.device))  # the folder's lock and recovery need the ranks together
    c = cfg.checkpoint
    plan = fetch = None
    if c.remote is not None and c.autoresume:
        plan = partial(plan_fetch, c.remote, c.save_folder)
        fetch = partial(fetch_part, c.remote, c.save_folder, rank=dist.get_global_rank(),
                        world_size=dist.get_world_size())
    lock, done = open_run_folder(c.save_folder, c.autoresume, cfg.train.max_batches, plan, fetch)
    try:
        if done is not None:
            log.info("the run in %s is complete: its latest checkpoint is batch %d of train.max_batches=%d; nothing "
                     "to do (raise train.max_batches to train on)", c.save_folder, done, cfg.train.max_batches)
        else:
            trainer = build_trainer(cfg)
            try:
                trainer.fit()
            except Preempted:
                trainer.close()  # the mirror callback's upload in flight ends first
                mirror(cfg)
                raise
            except (OSError, RuntimeError) as err:
                failure = disk_failure(err, c.save_folder, "the run folder (a checkpoint, metrics or masks)",
                                       "Nothing complete was deleted: free space and run the same command with "
                                       "checkpoint.autoresume=true; it resumes from the last complete checkpoint "
                                       "(a partial one is set aside)")
                if failure is None:
                    raise
                raise failure from err
            trainer.close()
        mirror(cfg)
    finally:
        lock.release()


def mirror(cfg: RunConfig) -> None:
    """With ``checkpoint.remote``, bring its mirror up to date: every rank uploads what the run's background
    uploads missed (its part), the ranks wait for each other without a collective timeout, then rank 0 moves the
    marker to the newest checkpoint complete in the store. Call it on every rank.

    Raises:
        RemoteError: on every rank, naming each rank's failed upload.
    """
    c = cfg.checkpoint
    if c.remote is None:
        return
    upload = Mirror(c.save_folder, Remote(c.remote), dist.get_global_rank(), dist.get_world_size())

    def move_marker() -> None:
        """Rank 0 moves the marker while the others wait in :func:`together`: a rank that exited first would
        make the launcher stop the others."""
        if dist.get_global_rank() == 0:
            upload.move_marker()
            upload.save()

    problems = together(upload.sync, f"uploading {c.save_folder} to {c.remote}")
    problems = problems or together(move_marker, f"moving the marker of {c.remote}")
    if problems:
        raise RemoteError("; ".join(problems))


def main(args: list[str]) -> int:
    """``RECIPE.yaml [key=value ...]``; returns the exit status: 2 for an invalid config, damaged data or a full
    disk, 3 for a run stopped by a non-finite loss, :data:`~llmshear.slurm.PREEMPTED_STATUS` for one stopped by
    SIGTERM / SIGUSR1 with a checkpoint."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{dist.get_global_rank()} %(name)s: %(message)s")
    if not args or args[0] in ("-h", "--help") or "=" in args[0]:
        log.error(USAGE)
        return 2
    try:
        cfg = load(args[0], args[1:])
        problems = weight_problems(cfg)
        if problems:
            raise ConfigError(problems, args[0])
        run(cfg)
    except (ConfigError, CheckpointError, ShardError, DiskError) as err:  # ShardError: data damaged after the checks
        log.error("%s", err)
        return 2
    except NonFiniteLossError as err:
        log.error("%s", err)
        return 3
    except Preempted as err:
        log.warning("%s", err)
        return PREEMPTED_STATUS
    return 0
