"""Turn a train.py checkpoint into a Hugging Face model directory (a pruning run's cut to its target), or prune a
recipe's source one-shot.

    python scripts/export_hf.py --checkpoint runs/prune/latest-rank0.pt --out out/pruned [--dtype bfloat16]
    python scripts/export_hf.py --checkpoint runs/continue/latest-rank0.pt --out out/final
    python scripts/export_hf.py --recipe yaml/demo/prune.yaml --out out/one_shot [key=value ...]

``--checkpoint``: the checkpoint's kind decides. A pruning run's is cut with its deterministic masks into a dense
model of exactly the target shape (``masks.pt`` and the cut's summary beside it); a continued run's is saved as it
is. ``--recipe``: one-shot pruning, no training: the recipe's source (``model.pretrained``) is scored by activation
importance on the calibration batches its run would draw (``pruning.init_batches`` batches of
``train.micro_batch_size`` sequences from its part of the train split) and cut to ``pruning.target``; the recipe
is checked as ``train.py`` checks it (``key=value`` overrides alike) before any weight is read. Continue with a
continue recipe, with ``distill:`` for Minitron's recipe (docs/pruning.md, *Which path*).

The directory loads with ``AutoTokenizer`` / ``AutoModelForCausalLM`` / ``pipeline`` and no code of ours: weights,
config, generation config, the tokenizer (by default the run's source's; ``--tokenizer SOURCE`` names another,
``--tokenizer none`` saves none), ``summary.json`` and a model card ``README.md``. An existing non-empty
``--out``, a missing, truncated or corrupt checkpoint, a tokenizer that cannot be loaded or non-finite weights
are errors and nothing is written. Prints the summary as one JSON line.

``--checkpoint s3://bucket/prefix/ep0-ba3200-rank0.pt`` (or ``s3://bucket/prefix``: its newest checkpoint) of a run
mirrored with ``checkpoint.remote`` is downloaded with its ``metrics.jsonl`` to a temporary directory (``TMPDIR``),
removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from llmshear.choices import DTYPE_NAMES
from llmshear.config import ConfigError, load
from llmshear.tools.export import export_checkpoint, prune_one_shot, tokenizer_argument

log = logging.getLogger("export_hf")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="Composer checkpoint of a train.py run (a .pt file or a sharded "
                       "directory, or s3://bucket/prefix[/ep<E>-ba<N>-rank0.pt] of a mirrored run)")
    model.add_argument("--recipe", help="a pruning recipe: prune its source one-shot by activation importance, no "
                       "training")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of --recipe's keys")
    parser.add_argument("--out", required=True, help="new (or empty) directory for the HF model")
    parser.add_argument("--tokenizer", help="whose tokenizer to save (HF dir, .gguf, smollm2; 'none': no tokenizer); "
                        "default: the run's source")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="dtype of the saved weights (default: float32)")
    args = parser.parse_args(argv)
    if args.overrides and args.recipe is None:
        parser.error(f"key=value overrides ({' '.join(args.overrides)}) apply to --recipe only")
    return args


def main(argv: list[str] | None = None) -> int:
    """Export (or prune one-shot); returns 2 on a bad argument, recipe, checkpoint or tokenizer."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = shlex.join(["python", "scripts/export_hf.py", *(sys.argv[1:] if argv is None else argv)])
    options = {"tokenizer": tokenizer_argument(args.tokenizer), "dtype": args.dtype, "command": command}
    try:
        if args.recipe is not None:
            cfg = load(args.recipe, args.overrides)
            if cfg.pruning is None:
                raise ConfigError([f"{args.recipe}: not a pruning recipe (it has no pruning: section)"])
            summary = prune_one_shot(cfg, args.out, **options)
        else:
            summary = export_checkpoint(args.checkpoint, args.out, **options)
    except (OSError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
