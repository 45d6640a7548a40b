"""A user's own Composer parts, named by import path in the recipes of tests/test_composer_parts.py."""

from __future__ import annotations

from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger


class MarkFitEnd(Callback):
    """Writes the batch reached into ``path`` at the end of training."""

    def __init__(self, path: str):
        self.path = path

    def fit_end(self, state: State, logger: Logger) -> None:
        Path(self.path).write_text(str(int(state.timestamp.batch)))


class NotAPart:
    """Neither a logger, a callback nor an algorithm."""
