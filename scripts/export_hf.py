"""Turn a continued-pre-training checkpoint into a Hugging Face model directory.

    python scripts/export_hf.py --checkpoint runs/continue/latest-rank0.pt --out out/final [--dtype bfloat16]

The directory loads with ``AutoTokenizer`` / ``AutoModelForCausalLM`` / ``pipeline`` and no code of ours: weights,
config, generation config, the tokenizer (by default the run's source's; ``--tokenizer SOURCE`` names another,
``--tokenizer none`` saves none), ``summary.json`` and a model card ``README.md``. An existing non-empty
``--out``, a missing, truncated or corrupt checkpoint, a tokenizer that cannot be loaded or non-finite weights
are errors and nothing is written. Prints one JSON line.

``--checkpoint s3://bucket/prefix/ep0-ba3200-rank0.pt`` (or ``s3://bucket/prefix``: its newest checkpoint) of a run
mirrored with ``checkpoint.remote`` is downloaded with its ``metrics.jsonl`` to a temporary directory (``TMPDIR``),
removed afterwards.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys

from llmshear.export import export_checkpoint, export_parser, tokenizer_argument

log = logging.getLogger("export_hf")


def main(argv: list[str] | None = None) -> int:
    """Export; returns 2 on a bad argument, checkpoint or tokenizer."""
    args = export_parser(__doc__, "Composer checkpoint of a train.py run (a .pt file or a sharded directory, "
                         "or s3://bucket/prefix[/ep<E>-ba<N>-rank0.pt] of a mirrored run)",
                         "new (or empty) directory for the HF model").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = shlex.join(["python", "scripts/export_hf.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        summary = export_checkpoint(args.checkpoint, args.out, tokenizer=tokenizer_argument(args.tokenizer),
                                    dtype=args.dtype, command=command)
    except (OSError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
