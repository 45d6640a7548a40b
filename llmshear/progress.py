"""Progress of a long loop: a tqdm bar on a terminal, log lines at an interval elsewhere (SLURM logs, pipes)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
LOG_INTERVAL_S = 30.0  # a batch job's log gets one line per this many seconds (and one at the end)


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "it", enabled: bool | None = None,
             interval: float = LOG_INTERVAL_S) -> Iterator[T]:
    """Yield ``items`` while reporting how far the loop is.

    Args:
        items: what to iterate.
        total: how many there are (None: unknown, no percentage or ETA).
        desc: what is being done (the bar's label, the log lines' prefix).
        unit: the unit of one item.
        enabled: None: a bar when stderr is a terminal, else log lines; True: a bar; False: silent.
        interval: seconds between two log lines.
    """
    if enabled is False:
        yield from items
        return
    if enabled or sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval:
            last = now
            log.info("%s", _line(desc, unit, done, total, now - start))
    log.info("%s (done)", _line(desc, unit, done, total, time.monotonic() - start))


def _line(desc: str, unit: str, done: int, total: int | None, elapsed: float) -> str:
    """``desc: 12/40 batch (30%), 1.5 batch/s, 0:00:08 elapsed, ETA 0:00:19``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"{desc}: {done}" + (f"/{total} {unit} ({100 * done / total:.0f}%)" if total else f" {unit}")
    text += f", {rate:.3g} {unit}/s, {_clock(elapsed)} elapsed"
    if total and rate > 0:
        text += f", ETA {_clock((total - done) / rate)}"
    return text


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
