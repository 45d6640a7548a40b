"""A metrics log a person or a plotting script can read: one JSON object per logging call, in the run folder."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"


def _scalar(value) -> float | None:
    """A float for a number or one-element tensor; None for anything else (which is not written)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu().item()) if value.numel() == 1 else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class JSONLinesLogger(LoggerDestination):
    """Appends ``{"batch": N, "<metric>": value, ...}`` lines to ``<folder>/metrics.jsonl`` on rank 0.

    A resumed run continues the file as if it had never stopped: the file's size is part of each checkpoint,
    and at the start of a resumed run the lines written after that checkpoint (by the run that was killed,
    which the resumed run logs again) are moved to ``metrics.superseded.jsonl``; a run starting from batch 0
    moves any earlier lines there too. NaN and infinite values, which JSON has no
    number for, are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (never ``null``); :func:`read_metrics`
    turns them back into floats.

    Args:
        folder: the run folder (created if needed).
        own_checkpoint: the run resumes from this folder's own checkpoint (autoresume), so the file continues even
            when the folder has moved since (a resume on another machine from ``checkpoint.remote``); otherwise it
            continues only when the checkpoint was written beside this very file, not for another run's
            (``load_path``).
    """

    def __init__(self, folder: str | Path, own_checkpoint: bool = False):
        self.path = Path(folder) / METRICS_FILE
        self.own_checkpoint = own_checkpoint
        self._file = None
        self._resume_size = 0
        self._opened_size = 0

    def init(self, state: State, logger: Logger) -> None:
        del state, logger
        if dist.get_global_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self._opened_size = self.path.stat().st_size

    def state_dict(self) -> dict:
        return {"path": str(self.path.resolve()), "size": self.path.stat().st_size} if self._file else {}

    def load_state_dict(self, state: dict) -> None:
        same_file = self.own_checkpoint or state.get("path") == str(self.path.resolve())
        self._resume_size = int(state.get("size", 0)) if same_file else 0

    def fit_start(self, state: State, logger: Logger) -> None:
        """Move what earlier processes logged after this run's starting point to ``metrics.superseded.jsonl``;
        the lines this process already wrote (callbacks log at start-up) stay."""
        del state, logger
        if self._file is None:
            return
        keep = min(self._resume_size, self._opened_size)
        data = self.path.read_bytes()
        dropped = data[keep:self._opened_size]
        if not dropped:
            return
        with open(self.path.with_name(SUPERSEDED_FILE), "ab") as handle:
            handle.write(dropped)
        os.truncate(self.path, keep)
        self._file.write(data[self._opened_size:].decode("utf-8"))
        self._file.flush()
        log.info("%s: %d lines logged after the point this run starts from moved to %s", self.path,
                 dropped.count(b"\n"), SUPERSEDED_FILE)

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
