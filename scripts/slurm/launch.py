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
import sys
from pathlib import Path

from llmshear.slurm import SlurmEnvironmentError, launch_command

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
    os.execvp(command[0], command)  # replaces this process; returns only by raising


if __name__ == "__main__":
    sys.exit(main())
