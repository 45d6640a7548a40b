"""Cut a pruning run's checkpoint into a dense Hugging Face model of the target shape.

    python scripts/prune.py --checkpoint runs/prune/ep0-ba3200-rank0.pt --out out/pruned [--dtype bfloat16]

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

from llmshear.export import export_parser, prune_checkpoint, tokenizer_argument

logger = logging.getLogger("prune")


def main(argv: list[str] | None = None) -> int:
    """Prune; returns 2 on a bad argument, checkpoint or tokenizer."""
    args = export_parser(__doc__, "Composer checkpoint of a pruning run (a .pt file or a sharded directory, "
                         "or s3://bucket/prefix[/ep<E>-ba<N>-rank0.pt] of a mirrored run)",
                         "new (or empty) directory for the pruned HF model").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = shlex.join(["python", "scripts/prune.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        summary = prune_checkpoint(args.checkpoint, args.out, tokenizer=tokenizer_argument(args.tokenizer),
                                   dtype=args.dtype, command=command)
    except (OSError, ValueError) as err:
        logger.error("%s", err)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
