"""Tokenize and pack jsonl documents per domain into MDS shards for training and evaluation.

    python scripts/prepare_data.py --input DIR --tokenizer smollm2 --out data/demo --seq-len 256 --eval-seqs 16

``DIR/<domain>/*.jsonl`` (or ``.jsonl.gz`` / ``.jsonl.zst``), one ``{"text": ...}`` a line, becomes
``OUT/train/<domain>/``, ``OUT/eval/<domain>/`` and ``OUT/summary.json``. With ``--layout redpajama`` DIR is
RedPajama as published (RedPajama-Data-1T's folders, the 1T-Sample's files, or documents naming their
``meta.redpajama_set_name``), split into the recipes' seven domains. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from llmshear.datasets.jsonl import BadLineError
from llmshear.datasets.mds import LAYOUTS, prepare

log = logging.getLogger("prepare_data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="directory with one sub-directory of jsonl files per domain")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory, a .gguf file, or 'smollm2'")
    parser.add_argument("--out", required=True, help="output directory (refused if it exists, see --overwrite)")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per packed sequence")
    parser.add_argument("--eval-seqs", type=int, required=True, help="sequences held out per domain for eval")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--domains", help="comma-separated domains to prepare, in this order (default: all, sorted)")
    parser.add_argument("--layout", choices=LAYOUTS, default="domains",
                        help="domains: DIR/<domain>/*.jsonl (default); redpajama: RedPajama as published")
    parser.add_argument("--strict", action="store_true",
                        help="fail at the first bad input line or truncated file (default: count / skip them)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    try:
        summary = prepare(args.input, args.tokenizer, args.out, seq_len=args.seq_len, eval_seqs=args.eval_seqs,
                          workers=args.workers, strict=args.strict, overwrite=args.overwrite, domains=domains,
                          layout=args.layout)
    except (BadLineError, OSError, ValueError) as err:  # OSError: a missing, existing or unwritable path; a full disk
        log.error("%s", err)
        return 2
    result = {"out": args.out, "dtype": summary["dtype"], "bad_lines": summary["bad_lines"],
              "skipped_files": {path: s["documents"] for path, s in summary["skipped_files"].items()},
              "domains": {name: {"train_sequences": d["train"]["sequences"], "eval_sequences": d["eval"]["sequences"],
                                 "tokens": d["tokens"]} for name, d in summary["domains"].items()}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
