"""Start this SLURM node's share of a run: ``composer`` with world size, node rank and master from SLURM.

Called once per node by ``prune.sbatch`` / ``continue.sbatch`` (``srun --ntasks-per-node=1``):

    python scripts/slurm/launch.py yaml/prune_1.3b.yaml [key=value ...]

``--dry-run`` prints the command instead of running it.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

from llmshear.slurm import STOP_SIGNALS, SlurmEnvironmentError, launch_command

log = logging.getLogger("launch")
TRAIN_SCRIPT = str(Path(__file__).resolve().parents[2] / "train.py")


def main(argv: list[str] | None = None) -> int:
    """Exec the launcher (or print it with ``--dry-run``); 2 for a usage or environment error."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    dry_run = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    if not args:
        log.error("usage: launch.py [--dry-run] RECIPE.yaml [key=value ...]")
        return 2
    launcher = shutil.which("composer", path=str(Path(sys.executable).parent)) or "composer"
    try:
        command = launch_command(os.environ, launcher, TRAIN_SCRIPT, args)
    except SlurmEnvironmentError as err:
        log.error("%s", err)
        return 2
    if dry_run:
        print(shlex.join(command))
        return 0
    log.info("%s", shlex.join(command))
    # SLURM signals every process of the step ahead of a preemption or the time limit: the training ranks write a
    # checkpoint and exit (llmshear.callbacks.preemption takes the signals when training starts; until then they
    # inherit the launcher's indifference); the launcher must outlive them to collect their status.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    os.execvp(command[0], command)  # replaces this process (ignored signals stay ignored); returns only by raising


if __name__ == "__main__":
    sys.exit(main())
