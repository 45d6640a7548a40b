"""Under ``composer -n 2``: :func:`llmshear.ranks.together` with work on rank 1 that outlasts the process group's
timeout (3 s), then work that fails on rank 1; each rank writes what it got to ``OUT/rank<R>.json``.

    composer -n 2 tests/together_worker.py OUT
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed
from composer.utils import dist

from llmshear.ranks import together


def slow() -> None:
    time.sleep(6 if dist.get_global_rank() == 1 else 0)


def failing() -> None:
    if dist.get_global_rank() == 1:
        raise OSError("no space left on the store")


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=3))
    started = time.monotonic()
    result = {"slow": together(slow, "a slow transfer"), "slow_s": time.monotonic() - started,
              "failed": together(failing, "a failing transfer")}
    Path(sys.argv[1], f"rank{dist.get_global_rank()}.json").write_text(json.dumps(result))
