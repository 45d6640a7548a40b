"""Tokenize and pack jsonl documents per domain into MDS shards for training and evaluation.

    python scripts/prepare_data.py --input DIR --tokenizer smollm2 --out data/demo --seq-len 256 --eval-seqs 16

``DIR/<domain>/*.jsonl`` (or ``.jsonl.gz`` / ``.jsonl.zst``), one ``{"text": ...}`` a line, becomes
``OUT/train/<domain>/``, ``OUT/eval/<domain>/`` and ``OUT/summary.json``. With ``--layout redpajama`` DIR is
RedPajama as published (RedPajama-Data-1T's folders, the 1T-Sample's files, or documents naming their
``meta.redpajama_set_name``), split into the recipes' seven domains. ``--max-tokens`` takes a token budget
(each domain's, or a total split by ``--proportions``) and stops reading a domain once it has it;
``--exclude-read`` leaves out the files an earlier output read, so a pruning set and a continued set drawn from one
corpus share no file. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

from llmshear.datasets.jsonl import BadLineError
from llmshear.datasets.mds import LAYOUTS, prepare

log = logging.getLogger("prepare_data")
SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}  # --max-tokens 400M, 0.4B, 50B


def token_count(text: str) -> int:
    """``--max-tokens``' value: a whole number of tokens, plain (``50000000000``, ``5e10``) or with a suffix k, M,
    B (or G), T (``400M``, ``0.4B``, ``50B``).

    Raises:
        ValueError: not such a number, or below 1 (the option is named).
    """
    body, scale = text.strip(), 1
    if body and body[-1].lower() in SUFFIXES:
        body, scale = body[:-1], SUFFIXES[body[-1].lower()]
    try:
        value = float(body.replace("_", "")) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1 or value != round(value):
        raise ValueError(f"--max-tokens {text!r}: expected a whole number of tokens >= 1, e.g. 400M, 0.4B, 50B")
    return int(round(value))


def budgets(max_tokens: str | None, proportions: str | None, domains: list[str] | None) -> int | dict | None:
    """Train tokens per domain from ``--max-tokens`` and ``--proportions`` (an int: each domain's; a dict: the
    total split over ``--domains`` by the proportions).

    Raises:
        ValueError: proportions without --max-tokens or --domains, of another length, not positive, or not
            summing to 1 (each option named).
    """
    if max_tokens is None:
        if proportions is not None:
            raise ValueError("--proportions needs --max-tokens (the total it splits)")
        return None
    total = token_count(max_tokens)
    if proportions is None:
        return total
    if not domains:
        raise ValueError("--proportions needs --domains, in the order of the proportions")
    try:
        weights = [float(p) for p in proportions.split(",")]
    except ValueError as err:
        raise ValueError(f"--proportions {proportions!r}: not comma-separated numbers ({err})") from None
    if len(weights) != len(domains):
        raise ValueError(f"--proportions has {len(weights)} values for {len(domains)} --domains ({', '.join(domains)})")
    if any(not w > 0 for w in weights) or abs(sum(weights) - 1) > 1e-3:
        raise ValueError(f"--proportions {proportions!r}: every value must be > 0 and they must sum to 1 "
                         f"(they sum to {sum(weights):.6g})")
    return {domain: max(1, round(total * w / sum(weights))) for domain, w in zip(domains, weights, strict=True)}


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
    parser.add_argument("--max-tokens",
                        help="train tokens per domain (400M, 0.4B, 50B, ...), or the total with --proportions; the "
                             "reading of a domain stops once it has them (default: read everything)")
    parser.add_argument("--proportions", help="comma-separated shares of --max-tokens, one per --domains entry")
    parser.add_argument("--exclude-read", action="append", default=[], metavar="PREPARED",
                        help="leave out the input files that this earlier output read (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    try:
        max_tokens = budgets(args.max_tokens, args.proportions, domains)
        summary = prepare(args.input, args.tokenizer, args.out, seq_len=args.seq_len, eval_seqs=args.eval_seqs,
                          workers=args.workers, strict=args.strict, overwrite=args.overwrite, domains=domains,
                          layout=args.layout, max_tokens=max_tokens, exclude_read=args.exclude_read)
    except (BadLineError, OSError, ValueError) as err:  # OSError: a missing, existing or unwritable path; a full disk
        log.error("%s", err)
        return 2
    result = {"out": args.out, "dtype": summary["dtype"], "bad_lines": summary["bad_lines"],
              "skipped_files": {path: s["documents"] for path, s in summary["skipped_files"].items()},
              "read_files": len(summary["read_files"]), "excluded_files": summary["excluded_files"],
              "domains": {name: {"train_sequences": d["train"]["sequences"], "eval_sequences": d["eval"]["sequences"],
                                 "tokens": d["tokens"], "budget_met": d["budget_met"]}
                          for name, d in summary["domains"].items()}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
