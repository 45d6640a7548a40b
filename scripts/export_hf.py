"""Turn a continued-pre-training checkpoint into a Hugging Face model directory.

    python scripts/export_hf.py --checkpoint runs/continue/latest-rank0.pt --out out/final [--tokenizer out/pruned]

The directory loads with ``AutoModelForCausalLM.from_pretrained(out)``. An existing non-empty ``--out``, or a
missing, truncated or corrupt checkpoint, is an error and nothing is written. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from llmshear.export import export_checkpoint
from llmshear.models.sources import load_tokenizer

log = logging.getLogger("export_hf")


def main(argv: list[str] | None = None) -> int:
    """Export; returns 2 on a bad argument or checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Composer checkpoint (.pt) of a train.py run")
    parser.add_argument("--out", required=True, help="new (or empty) directory for the HF model")
    parser.add_argument("--tokenizer", help="source whose tokenizer to save alongside (HF dir, .gguf, smollm2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        summary = export_checkpoint(args.checkpoint, args.out, tokenizer=tokenizer)
    except (OSError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
