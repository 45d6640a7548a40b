"""Cut a pruning run's checkpoint into a dense Hugging Face model of the target shape, or prune one-shot.

    python scripts/prune.py --checkpoint runs/prune/ep0-ba3200-rank0.pt --out out/pruned [--dtype bfloat16]
    python scripts/prune.py --recipe yaml/demo/prune.yaml --out out/one_shot [key=value ...]

``--recipe``: one-shot pruning, no training: the recipe's source (``model.pretrained``) is scored by activation
importance on the calibration batches its run would draw (``pruning.init_batches`` batches of
``train.micro_batch_size`` sequences from its part of the train split) and cut to ``pruning.target``; the recipe
is checked as ``train.py`` checks it (``key=value`` overrides alike) before any weight is read. Continue with a
continue recipe, with ``distill:`` for Minitron's recipe (docs/pruning.md, *Which path*).

Writes ``out/pruned``: config.json, generation_config.json, safetensors, the tokenizer (by default the run's
source's; ``--tokenizer SOURCE`` names another, ``--tokenizer none`` saves none), ``masks.pt``, ``summary.json``
and a model card ``README.md``; prints the summary as one JSON object. An existing non-empty ``--out``, an
unreadable checkpoint, a tokenizer that cannot be loaded or non-finite weights are errors and nothing is written.

``--checkpoint s3://bucket/prefix/ep0-ba3200-rank0.pt`` (or ``s3://bucket/prefix``: its newest checkpoint) of a run
mirrored with ``checkpoint.remote`` is downloaded with its ``metrics.jsonl`` to a temporary directory (``TMPDIR``),
removed afterwards.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys

from llmshear.config import ConfigError, load
from llmshear.export import export_parser, prune_checkpoint, prune_one_shot, tokenizer_argument

logger = logging.getLogger("prune")


def main(argv: list[str] | None = None) -> int:
    """Prune; returns 2 on a bad argument, recipe, checkpoint or tokenizer."""
    parser = export_parser(__doc__, "Composer checkpoint of a pruning run (a .pt file or a sharded directory, "
                           "or s3://bucket/prefix[/ep<E>-ba<N>-rank0.pt] of a mirrored run)",
                           "new (or empty) directory for the pruned HF model",
                           "a pruning recipe: prune its source one-shot by activation importance, no training")
    args = parser.parse_args(argv)
    if args.overrides and args.recipe is None:
        parser.error(f"key=value overrides ({' '.join(args.overrides)}) apply to --recipe only")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = shlex.join(["python", "scripts/prune.py", *(sys.argv[1:] if argv is None else argv)])
    options = {"tokenizer": tokenizer_argument(args.tokenizer), "dtype": args.dtype, "command": command}
    try:
        if args.recipe is not None:
            cfg = load(args.recipe, args.overrides)
            if cfg.pruning is None:
                raise ConfigError([f"{args.recipe}: not a pruning recipe (it has no pruning: section)"])
            summary = prune_one_shot(cfg, args.out, **options)
        else:
            summary = prune_checkpoint(args.checkpoint, args.out, **options)
    except (OSError, ValueError) as err:
        logger.error("%s", err)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
