"""Per-domain reference losses for ``data.reference_losses``: a source model's eval loss, or a scaling-law fit.

    python scripts/reference_loss.py --source smollm2 --data data/demo/eval
    python scripts/reference_loss.py --fit sizes.json --target-params 1.3e9

Prints a YAML block list in domain order, then one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from llmshear.datasets.reference import eval_domains, scaling_reference, split_fingerprints, yaml_list
from llmshear.datasets.vocab import check_vocab
from llmshear.models.llama import DTYPES
from llmshear.tools.evaluation import check_device, mean_domain_losses

log = logging.getLogger("reference_loss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--source", help="model: HF directory, .gguf file or 'smollm2' (with --data)")
    mode.add_argument("--fit", help="sizes.json: losses of models of several sizes (with --target-params)")
    parser.add_argument("--data", help="eval split directory written by prepare_data.py (OUT/eval)")
    parser.add_argument("--domains", help="comma-separated domains, in output order (default: the data's order)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default: 4)")
    parser.add_argument("--max-seqs", type=int, help="evaluate at most this many sequences per domain")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default: float32)")
    parser.add_argument("--target-params", type=float, help="parameter count of the target model (with --fit)")
    args = parser.parse_args(argv)
    if args.source and not args.data:
        parser.error("--source needs --data OUT/eval")
    if args.fit and args.target_params is None:
        parser.error("--fit needs --target-params")
    if args.batch_size < 1 or (args.max_seqs is not None and args.max_seqs < 1):
        parser.error("--batch-size and --max-seqs must be positive")
    return args


def from_source(args: argparse.Namespace) -> tuple[dict, str]:
    """Load the model, evaluate it on every domain of ``--data``."""
    from llmshear.models.hf import load_config, load_model

    check_device(args.device)
    domains = [d.strip() for d in args.domains.split(",")] if args.domains else eval_domains(args.data)
    check_vocab(args.data, domains, load_config(args.source).vocab_size, args.source, "--source")
    model = load_model(args.source, dtype=DTYPES[args.dtype], device=args.device)
    losses = mean_domain_losses(model, args.data, domains, args.batch_size, args.max_seqs, args.device, progress=True)
    result = {"domains": losses["domains"], "reference_losses": losses["losses"], "tokens": losses["tokens"],
              "source": args.source, "params": sum(p.numel() for p in model.parameters()),
              "split": str(args.data), "eval_fingerprints": split_fingerprints(args.data, domains)}
    return result, f"mean next-token loss of {args.source} on {args.data} (source reference)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.source:
            result, comment = from_source(args)
        else:
            result = scaling_reference(args.fit, args.target_params)
            comment = f"L(N) = a/N^b + c fitted per domain on {args.fit}, at N = {args.target_params:.4g}"
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(yaml_list(result, comment))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
