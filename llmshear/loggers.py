"""A metrics log a person or a plotting script can read: one JSON object per logging call, in the run folder."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _scalar(value) -> float | None:
    """A float for a number or one-element tensor; None for anything else (which is not written)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu().item()) if value.numel() == 1 else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class JSONLinesLogger(LoggerDestination):
    """Appends ``{"batch": N, "<metric>": value, ...}`` lines to ``<folder>/metrics.jsonl`` on rank 0.

    The file is opened for appending, so a resumed run continues it; batches logged twice (after a resume
    from an earlier checkpoint) appear twice, the later line being the one that counts. NaN and infinite
    values, which JSON has no number for, are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``
    (never ``null``); :func:`read_metrics` turns them back into floats.

    Args:
        folder: the run folder (created if needed).
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / METRICS_FILE
        self._file = None

    def init(self, state: State, logger: Logger) -> None:
        del state, logger
        if dist.get_global_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self._file is None:
            return
        line = {"batch": step}
        for name, value in metrics.items():
            number = _scalar(value)
            if number is not None:
                line[name] = number if math.isfinite(number) else str(number)
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        del state, logger
        if self._file is not None:
            self._file.close()
            self._file = None


NON_FINITE = {str(x): x for x in (math.nan, math.inf, -math.inf)}  # as the logger writes them: "nan", "inf", "-inf"


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a ``metrics.jsonl`` file as dicts, ``"nan"`` / ``"inf"`` / ``"-inf"`` values as floats (a
    truncated last line, from a killed run, is skipped)."""
    rows = []
    for number, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an unreadable line", path, number)
            continue
        rows.append({key: NON_FINITE.get(value, value) if isinstance(value, str) else value
                     for key, value in row.items()})
    return rows
