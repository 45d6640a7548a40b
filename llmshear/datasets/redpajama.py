"""RedPajama as it is published, mapped to the recipes' seven domains.

Three published forms are recognised, file by file and document by document:

* RedPajama-Data-1T (``urls.txt`` download): one folder per source, ``arxiv/``, ``book/``, ``c4/``,
  ``common_crawl/<dump>/``, ``github/``, ``stackexchange/``, ``wikipedia/``: the folder names the domain;
* RedPajama-Data-1T-Sample: flat files ``arxiv_sample.jsonl``, ``c4_sample.jsonl``, ``cc_2019-30_sample.jsonl``,
  ...: the file name's first word names the domain;
* documents that carry their set, ``meta.redpajama_set_name`` (``RedPajamaCommonCrawl``, ... as in SlimPajama)
  or ``red_pajama_subset`` (``common_crawl``, ... as the Hugging Face loader of RedPajama-Data-1T adds): the
  document's own set wins over its file's.
"""

from __future__ import annotations

from pathlib import Path

from llmshear.datasets.jsonl import SUFFIXES

DOMAINS = ("arxiv", "book", "c4-rp", "cc", "github", "stackexchange", "wiki")
SET_NAMES = {"RedPajamaArXiv": "arxiv", "RedPajamaBook": "book", "RedPajamaC4": "c4-rp",
             "RedPajamaCommonCrawl": "cc", "RedPajamaGithub": "github", "RedPajamaStackExchange": "stackexchange",
             "RedPajamaWikipedia": "wiki"}
SUBSETS = {"arxiv": "arxiv", "book": "book", "books": "book", "c4": "c4-rp", "common_crawl": "cc", "cc": "cc",
           "github": "github", "stackexchange": "stackexchange", "wikipedia": "wiki", "wiki": "wiki"}
FOLDERS = SUBSETS | {name: name for name in DOMAINS}  # the 1T download's folders, or folders already named ours


def file_domain(root: Path, path: Path) -> str | None:
    """The domain a file's place names: its top folder under ``root`` (1T) or its name's first word (Sample)."""
    relative = path.relative_to(root)
    if len(relative.parts) > 1 and relative.parts[0] in FOLDERS:
        return FOLDERS[relative.parts[0]]
    return SUBSETS.get(relative.name.split("_", 1)[0].split(".", 1)[0])


def document_domain(obj: dict, default: str | None) -> tuple[str | None, str | None]:
    """``(domain, None)`` of one document (its own set, else ``default``), or ``(None, reason)``."""
    meta = obj.get("meta")
    name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    if name is not None:
        return (SET_NAMES[name], None) if name in SET_NAMES else (None, f"unknown meta.redpajama_set_name {name!r}")
    subset = obj.get("red_pajama_subset")
    if subset is not None:
        return (SUBSETS[subset], None) if subset in SUBSETS else (None, f"unknown red_pajama_subset {subset!r}")
    if default is None:
        return None, "no meta.redpajama_set_name and the file's name or folder names no RedPajama source"
    return default, None


def find_files(root: str | Path, only: list[str] | None = None) -> list[tuple[Path, str | None]]:
    """``(file, domain its place names or None)`` for every input file under ``root``, sorted by path.

    Files whose place names a domain outside ``only`` are left out unread.

    Raises:
        FileNotFoundError: ``root`` is not a directory or holds no input file.
        ValueError: ``only`` names a domain RedPajama does not have.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--input {root}: no such directory")
    unknown = sorted(set(only or ()) - set(DOMAINS))
    if unknown:
        raise ValueError(f"--domains {','.join(unknown)}: not RedPajama domains (known: {', '.join(DOMAINS)})")
    files = [(p, file_domain(root, p)) for p in sorted(root.rglob("*")) if p.is_file() and p.name.endswith(SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"--input {root}: no {'/'.join(SUFFIXES)} files below it")
    return [(p, d) for p, d in files if not only or d is None or d in only]
