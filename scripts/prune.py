"""Cut a pruning run's checkpoint into a dense Hugging Face model of the target shape.

    python scripts/prune.py --checkpoint runs/prune/ep0-ba3200-rank0.pt --out out/pruned [--tokenizer smollm2]

Writes ``out/pruned`` (config.json, safetensors, tokenizer when given, ``masks.pt``, ``summary.json``) and
prints the summary as one JSON object. An existing non-empty ``--out`` or an unreadable checkpoint is an error
and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from llmshear.models.prune import prune_checkpoint
from llmshear.models.sources import load_tokenizer

logger = logging.getLogger("prune")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Composer checkpoint (.pt) of a pruning run")
    parser.add_argument("--out", required=True, help="new (or empty) directory for the pruned HF model")
    parser.add_argument("--tokenizer", help="source whose tokenizer to save alongside (HF dir, .gguf, smollm2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        summary = prune_checkpoint(args.checkpoint, args.out, tokenizer=tokenizer)
    except (OSError, ValueError) as err:
        logger.error("%s", err)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
