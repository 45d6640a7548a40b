"""Write a demo corpus of real text already on this machine (no network): OUT/<domain>/*.jsonl.

    python scripts/make_demo_corpus.py data/demo_corpus

Domains: ``code`` (the Python standard library's sources), ``docs`` (the reference-manual topics in
``pydoc_data``), ``readme`` (the README text in the metadata of the installed packages). The last line printed
is a JSON summary (documents, characters, files per domain).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from llmshear.tools.demo import make_demo_corpus

log = logging.getLogger("make_demo_corpus")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--max-chars", type=int, default=3_000_000, help="characters per domain at most")
    parser.add_argument("--docs-per-file", type=int, default=50, help="documents per jsonl file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = make_demo_corpus(args.out, args.max_chars, args.docs_per_file, args.overwrite)
    except (FileExistsError, ValueError) as err:
        log.error("%s", err)
        return 2
    for name, info in summary.items():
        log.info("%s: %d documents, %d characters in %d files", name, info["documents"], info["characters"],
                 info["files"])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
