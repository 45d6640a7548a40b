"""Generate text with a saved model through Hugging Face ``transformers`` alone (no llmshear code in the loop;
llmshear only checks that the directory is complete).

    python scripts/generate.py --model out/demo/final --prompt "def fibonacci(n):"

Prints the prompt and its greedy continuation (with a repetition penalty: a small model trained briefly, like
the demo's, otherwise tends to repeat one token).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmshear.models.weights import has_weights
from llmshear.sources import has_tokenizer

log = logging.getLogger("generate")


def main(argv: list[str] | None = None) -> int:
    """Load ``--model`` with ``AutoModelForCausalLM`` and print a greedy continuation of ``--prompt``; 2 when it is
    not a directory with a config, weights and a tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model directory with a tokenizer")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--repetition-penalty", type=float, default=1.3, help="1.0: none (plain greedy decoding)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    model_dir = Path(args.model)
    missing = [what for what, ok in (("config.json", (model_dir / "config.json").is_file()),
                                     ("weights", model_dir.is_dir() and has_weights(model_dir)),
                                     ("tokenizer", model_dir.is_dir() and has_tokenizer(model_dir))) if not ok]
    if missing:
        log.error("--model %s: not a model directory to generate with (no %s); export one with "
                  "scripts/export_hf.py or scripts/export_hf.py", model_dir, ", no ".join(missing))
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                repetition_penalty=args.repetition_penalty,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
