"""Prune or continue pre-training a LLaMA-family model with Composer.

    composer train.py yaml/prune_1.3b.yaml [key=value ...]      # every GPU of this node (or: composer -n 2 ...)
    python train.py yaml/demo/prune.yaml [key=value ...]        # one process

The run itself is :mod:`llmshear.run`: the recipe and its overrides are validated before any weight or data is
read (every problem at once, naming its key); at the end the run folder holds the checkpoints,
``metrics.jsonl``, ``masks/`` (pruning runs) and ``proportions.json`` (the final domain proportions).
"""

import sys

from llmshear.run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
