"""Input documents: ``DIR/<domain>/*.jsonl`` (also ``.jsonl.gz`` / ``.jsonl.zst``), one ``{"text": ...}`` a line.

Bad lines (invalid UTF-8, invalid JSON, not an object, missing / non-string / empty ``text``) are counted per
file with ``file:line`` examples, or raise at the first one in strict mode. Blank lines are skipped silently.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
MAX_EXAMPLES = 3


class BadLineError(ValueError):
    """A bad input line in strict mode; the message starts with ``file:line``."""


@dataclass
class BadLines:
    """Bad lines of one file: how many, and the first few as ``file:line: reason``."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")


def is_input_file(path: Path) -> bool:
    """Whether ``path`` is a JSON-lines file this reader accepts (by suffix)."""
    return path.is_file() and path.name.endswith(SUFFIXES)


def find_domains(root: str | Path, only: list[str] | None = None) -> dict[str, list[Path]]:
    """The input files of each domain, ``{domain: sorted files}``, domains sorted by name.

    Args:
        root: the directory holding one sub-directory per domain.
        only: keep these domains (in this order) instead of every sub-directory.

    Raises:
        FileNotFoundError: ``root`` or a requested domain is missing, or a domain has no input file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--input {root}: no such directory")
    names = only if only else sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise FileNotFoundError(f"--input {root}: no domain sub-directories (expected {root}/<domain>/*.jsonl)")
    domains = {}
    for name in names:
        directory = root / name
        if not directory.is_dir():
            raise FileNotFoundError(f"domain {name!r}: {directory} is not a directory")
        files = sorted(p for p in directory.iterdir() if is_input_file(p))
        if not files:
            raise FileNotFoundError(f"domain {name!r}: no {'/'.join(SUFFIXES)} files in {directory}")
        domains[name] = files
    return domains


def open_binary(path: Path) -> io.BufferedIOBase:
    """A binary reader of ``path``, decompressing ``.gz`` and ``.zst``."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def parse_line(raw: bytes) -> tuple[str | None, str | None]:
    """``(text, None)`` for a good line, ``(None, reason)`` for a bad one, ``(None, None)`` for a blank one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8 at byte {err.start}"
    if not line.strip():
        return None, None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg}, column {err.colno})"
    if not isinstance(obj, dict):
        return None, f"not a JSON object but {type(obj).__name__}"
    if "text" not in obj:
        return None, "no 'text' field"
    text = obj["text"]
    if not isinstance(text, str):
        return None, f"'text' is {type(text).__name__}, not a string"
    if not text.strip():
        return None, "empty 'text'"
    return text, None


def read_documents(path: Path, bad: BadLines, strict: bool = False) -> Iterator[str]:
    """The ``text`` of every good line of ``path``, in file order; bad lines go to ``bad``.

    Raises:
        BadLineError: in strict mode, at the first bad line (the message is ``file:line: reason``).
    """
    with open_binary(path) as stream:
        for number, raw in enumerate(stream, 1):
            text, reason = parse_line(raw)
            if text is not None:
                yield text
            elif reason is not None:
                if strict:
                    raise BadLineError(f"{path}:{number}: {reason}")
                bad.add(f"{path}:{number}", reason)
