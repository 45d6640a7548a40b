"""Prune or continue pre-training a LLaMA-family model with Composer.

    composer train.py yaml/prune_1.3b.yaml [key=value ...]      # every GPU of this node (or: composer -n 2 ...)
    python train.py yaml/demo/prune.yaml [key=value ...]        # one process

The recipe and its overrides are validated before any weight or data is read (every problem at once, naming
its key). At the end the run folder holds the checkpoints, ``metrics.jsonl``, ``masks/`` (pruning runs) and
``proportions.json`` (the final domain proportions, which ``data.proportions_from`` of a later run reads).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from composer.utils import dist, get_device

from llmshear.builders import build_trainer
from llmshear.callbacks.nonfinite import NonFiniteLossError
from llmshear.checkpoints import CheckpointError, open_run_folder
from llmshear.config import ConfigError, RunConfig, load
from llmshear.datasets.mds import ShardError

log = logging.getLogger("train")

PROPORTIONS_FILE = "proportions.json"


def write_final_proportions(cfg: RunConfig, proportions: list[float]) -> Path | None:
    """Write ``<save_folder>/proportions.json`` on rank 0 (replacing the one of an earlier, shorter fit)."""
    if dist.get_global_rank() != 0:
        return None
    path = Path(cfg.checkpoint.save_folder) / PROPORTIONS_FILE
    content = {"domains": cfg.data.domains, "proportions": [float(p) for p in proportions]}
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def run(cfg: RunConfig) -> None:
    """Lock (and, resuming, recover) the run folder, build everything, fit, and record the final proportions.

    Raises:
        CheckpointError: the run folder is in use by another run (see :func:`llmshear.checkpoints.open_run_folder`).
    """
    dist.initialize_dist(get_device(cfg.train.device))  # the folder's lock and recovery need the ranks together
    c = cfg.checkpoint
    lock, done = open_run_folder(c.save_folder, c.autoresume, cfg.train.max_batches)
    try:
        if done is not None:
            log.info("the run in %s is complete: its latest checkpoint is batch %d of train.max_batches=%d; nothing "
                     "to do (raise train.max_batches to train on)", c.save_folder, done, cfg.train.max_batches)
            return
        trainer = build_trainer(cfg)
        trainer.fit()
        dataset = trainer.state.train_dataloader.dataset
        path = write_final_proportions(cfg, dataset.proportions)
        if path is not None:
            log.info("final domain proportions: %s", path)
        trainer.close()
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    """``train.py RECIPE.yaml [key=value ...]``; returns the exit status (2 for an invalid config, 3 for a run
    stopped by a non-finite loss)."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{dist.get_global_rank()} %(name)s: %(message)s")
    if not args or args[0] in ("-h", "--help") or "=" in args[0]:
        log.error("usage: train.py RECIPE.yaml [key=value ...]")
        return 2
    try:
        cfg = load(args[0], args[1:])
        run(cfg)
    except (ConfigError, CheckpointError, ShardError) as err:  # a ShardError: data damaged after the checks
        log.error("%s", err)
        return 2
    except NonFiniteLossError as err:
        log.error("%s", err)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
