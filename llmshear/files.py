"""Writing a small file so that readers see the old content or the new, never a part: a temporary file beside it,
then an atomic rename."""

from __future__ import annotations

import json
import os
from pathlib import Path


def replace_json(path: str | os.PathLike, content, indent: int | None = None) -> None:
    """``content`` as JSON at ``path``, through a hidden temporary file (``.<name>.<pid>``) renamed over it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    text = json.dumps(content, indent=indent)
    temporary.write_text(text + "\n" if indent is not None else text, encoding="utf-8")
    os.replace(temporary, path)
