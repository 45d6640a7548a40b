"""A demo corpus of real text that the set-up itself installs, written as ``OUT/<domain>/*.jsonl`` without network.

Domains (each document is one JSON line ``{"text": ..., "source": ...}``):

- ``code``: the Python standard library's own ``.py`` sources (test packages excluded), one file a document;
- ``docs``: the reference-manual topics shipped in ``pydoc_data.topics`` (what ``help("FOR")`` prints);
- ``readme``: the long descriptions (README text) in the metadata of every package installed in the
  running environment (torch, transformers, Composer, streaming, … after ``make setup``).

Files are walked in sorted order and each domain is cut at ``max_chars``, so the corpus is the same on every
machine with the same Python and packages.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

SKIPPED_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
MIN_README_CHARS = 200


def code_documents() -> Iterator[tuple[str, str]]:
    """``(source, text)`` for every standard-library ``.py`` file outside test packages, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield f"stdlib/{path.relative_to(root).as_posix()}", text


def docs_documents() -> Iterator[tuple[str, str]]:
    """``(source, text)`` for every topic of the Python reference manual in ``pydoc_data``, by topic name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if topics[name].strip():
            yield f"pydoc_data/{name}", topics[name]


def readme_documents() -> Iterator[tuple[str, str]]:
    """``(source, text)``: each installed distribution's long description, by lower-cased package name."""
    seen = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if name and name not in seen and len(text.strip()) >= MIN_README_CHARS:
            seen[name] = text
    for name in sorted(seen):
        yield f"metadata/{name}", seen[name]


DOMAINS: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
    "code": code_documents,
    "docs": docs_documents,
    "readme": readme_documents,
}


def _write_domain(directory: Path, documents: Iterator[tuple[str, str]], max_chars: int, docs_per_file: int) -> dict:
    """Write ``directory/<name>-NNN.jsonl`` files; return documents, characters and files written."""
    directory.mkdir(parents=True)
    count = chars = files = 0
    handle = None
    for source, text in documents:
        if chars >= max_chars:
            break
        if count % docs_per_file == 0:
            if handle:
                handle.close()
            handle = open(directory / f"{directory.name}-{files:03d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
            files += 1
        handle.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
        count, chars = count + 1, chars + len(text)
    if handle:
        handle.close()
    return {"documents": count, "characters": chars, "files": files}


def make_demo_corpus(out: str | Path, max_chars: int = 3_000_000, docs_per_file: int = 50,
                     overwrite: bool = False) -> dict:
    """Write the demo corpus (see the module docstring) to ``out``.

    Args:
        out: the output directory (``out/<domain>/*.jsonl``).
        max_chars: characters per domain at most (a domain stops after the document that crosses it).
        docs_per_file: documents per jsonl file (files are the unit of parallel tokenization).
        overwrite: replace an existing ``out``.

    Returns:
        ``{domain: {"documents", "characters", "files"}}``, also written to ``out/sources.json``.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
        ValueError: a non-positive ``max_chars`` or ``docs_per_file``.
    """
    out = Path(out)
    if max_chars <= 0 or docs_per_file <= 0:
        raise ValueError(f"--max-chars {max_chars} and --docs-per-file {docs_per_file} must be positive")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists():
        shutil.rmtree(out)
    summary = {name: _write_domain(out / name, documents(), max_chars, docs_per_file)
               for name, documents in DOMAINS.items()}
    (out / "sources.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
