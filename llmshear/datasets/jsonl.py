"""Input documents: ``DIR/<domain>/*.jsonl`` (also ``.jsonl.gz`` / ``.jsonl.zst``), one ``{"text": ...}`` a line.

Bad lines (invalid UTF-8, invalid JSON, not an object, missing / non-string / empty ``text``) are counted per
file with ``file:line`` examples, or raise at the first one in strict mode. Blank lines are skipped silently.
A compressed file that ends inside its compressed stream (a cut download) or holds corrupt compressed data
raises :class:`CorruptFileError` naming the file: it is never read as if it ended early.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmshear.files import PLAIN_NAME

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
MAX_EXAMPLES = 3
_CHUNK = 1 << 20
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, which editors on Windows put before the first line


class BadLineError(ValueError):
    """A bad input line in strict mode; the message starts with ``file:line``."""


class CorruptFileError(ValueError):
    """A truncated or corrupt compressed input file; the message starts with the file."""


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


def _refuse_broken_links(paths) -> None:
    """A link that leads nowhere (its target missing, or a loop) would drop a domain or a file without a word."""
    for path in paths:
        if path.is_symlink() and not path.exists():
            raise FileNotFoundError(f"{path} is a link to {os.readlink(path)}, which does not exist (or loops): "
                                    "fix or remove the link")


def find_domains(root: str | Path, only: list[str] | None = None) -> dict[str, list[Path]]:
    """The input files of each domain, ``{domain: sorted files}``, domains sorted by name.

    Args:
        root: the directory holding one sub-directory per domain.
        only: keep these domains (in this order) instead of every sub-directory.

    Raises:
        FileNotFoundError: ``root`` or a requested domain is missing, a domain has no input file, or a domain
            folder or input file is a link that leads nowhere.
        ValueError: a requested domain is not a plain name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--input {root}: no such directory")
    for name in only or []:
        if not PLAIN_NAME.fullmatch(name):
            raise ValueError(f"--domains {name!r}: a domain is a plain folder name under --input (letters, digits, "
                             "'.', '_', '-'), not a path")
    entries = sorted(root.iterdir())
    _refuse_broken_links(p for p in entries if not only or p.name in only)
    names = only if only else [p.name for p in entries if p.is_dir()]
    if not names:
        raise FileNotFoundError(f"--input {root}: no domain sub-directories (expected {root}/<domain>/*.jsonl)")
    domains = {}
    for name in names:
        directory = root / name
        if not directory.is_dir():
            raise FileNotFoundError(f"domain {name!r}: {directory} is not a directory")
        listed = sorted(directory.iterdir())
        _refuse_broken_links(p for p in listed if p.name.endswith(SUFFIXES))
        files = [p for p in listed if is_input_file(p)]
        if not files:
            raise FileNotFoundError(f"domain {name!r}: no {'/'.join(SUFFIXES)} files in {directory}")
        domains[name] = files
    return domains


class _ZstdFrames(io.RawIOBase):
    """Decompressed bytes of a file of concatenated zstd frames; ``EOFError`` when the file ends inside a frame.

    ``zstandard``'s stream reader returns a cut frame's bytes as if the file had ended there, which would
    silently drop the rest of a truncated download.
    """

    def __init__(self, path: Path):
        super().__init__()
        import zstandard

        self._zstd = zstandard
        self._file = open(path, "rb")
        self._frame = None
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            if self._frame is None or self._frame.eof:
                data = self._frame.unused_data if self._frame is not None else b""
                data = data or self._file.read(_CHUNK)
                if not data:
                    return 0  # the file ends between frames: complete
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
            else:
                data = self._file.read(_CHUNK)
                if not data:
                    raise EOFError("the file ends inside a zstd frame")
            self._pending = self._frame.decompress(data)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        self._file.close()
        super().close()


def open_binary(path: Path) -> io.BufferedIOBase:
    """A binary reader of ``path``, decompressing ``.gz`` and ``.zst`` (a cut stream raises ``EOFError``)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path))
    return open(path, "rb")


def parse_record(raw: bytes) -> tuple[dict | None, str | None]:
    """``(object, None)`` for a good line, ``(None, reason)`` for a bad one, ``(None, None)`` for a blank one.

    A good line is a JSON object with a non-empty string ``text``.
    """
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
    return obj, None


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What reading a cut or corrupt compressed stream raises (gzip: EOFError / BadGzipFile / zlib.error)."""
    import zstandard

    return EOFError, OSError, zlib.error, zstandard.ZstdError


def read_records(path: Path, bad: BadLines, strict: bool = False) -> Iterator[tuple[int, dict]]:
    """``(line number, JSON object)`` of every good line of ``path``, in file order; bad lines go to ``bad``.

    Raises:
        BadLineError: in strict mode, at the first bad line (the message is ``file:line: reason``).
        CorruptFileError: the file cannot be read to its end (a truncated or corrupt compressed stream, an
            I/O error); the message names the file and how far it was read.
    """
    number = 0
    try:
        with open_binary(path) as stream:
            for number, raw in enumerate(stream, 1):
                obj, reason = parse_record(raw.removeprefix(BOM) if number == 1 else raw)
                if obj is not None:
                    yield number, obj
                elif reason is not None:
                    if strict:
                        raise BadLineError(f"{path}:{number}: {reason}")
                    bad.add(f"{path}:{number}", reason)
    except _stream_errors() as err:
        kind = "compressed stream" if path.name.endswith((".gz", ".zst")) else "file"
        raise CorruptFileError(f"{path}: truncated or corrupt {kind} after line {number} "
                               f"({type(err).__name__}: {err})") from err


def read_documents(path: Path, bad: BadLines, strict: bool = False) -> Iterator[str]:
    """The ``text`` of every good line of ``path`` (see :func:`read_records`)."""
    for _, obj in read_records(path, bad, strict):
        yield obj["text"]
