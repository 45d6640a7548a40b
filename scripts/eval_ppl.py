"""Per-domain loss and perplexity of one or more models on MDS evaluation data.

    python scripts/eval_ppl.py --model out/final --data out/data/eval
    python scripts/eval_ppl.py --model smollm2 --model out/pruned --model out/final --data out/data/eval
    python scripts/eval_ppl.py --model out/final --data out/data/eval --device cuda --dtype bfloat16

``--model`` is anything the model loader accepts (HF directory, ``.gguf``, ``smollm2``, a preset). Progress goes
to stderr (a bar on a terminal, log lines every 30 s otherwise). Prints a perplexity table (domains x models),
then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from llmshear.datasets.reference import eval_domains
from llmshear.datasets.vocab import check_vocab
from llmshear.models.hf import load_config, load_model
from llmshear.models.llama import DTYPES
from llmshear.tools.evaluation import check_device, evaluate_domains, format_table

log = logging.getLogger("eval_ppl")


def main(argv: list[str] | None = None) -> int:
    """Evaluate every ``--model``; 2 on a bad argument."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="model source (repeatable)")
    parser.add_argument("--data", required=True, type=Path, help="split directory with one MDS dir per domain")
    parser.add_argument("--domains", nargs="+", help="domains to evaluate (default: all, in prepare_data's order)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seqs", type=int, help="at most this many sequences per domain")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default: float32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_device(args.device)
        domains = args.domains or eval_domains(args.data)
        results = {}
        for source in args.model:
            log.info("evaluating %s", source)
            check_vocab(args.data, domains, load_config(source).vocab_size, source, "--model")
            model = load_model(source, dtype=DTYPES[args.dtype], device=args.device)
            results[source] = evaluate_domains(model, args.data, domains, args.batch_size, args.max_seqs,
                                               args.device, progress=True)
    except (OSError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(format_table(results))
    print(json.dumps({"data": str(args.data), "models": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
