#!/usr/bin/env bash
# The resource table of every shipped recipe in docs/recipes.md, printed as markdown by scripts/plan.py:
# pruning on 8 GPUs, continued pre-training on 32 (the recipes' own comments), the demos on one device.
# LLaMA2-7B is planned from its public shape (the llama2-7b preset); a continued run from its pruning
# recipe's cut shape (--after). No weights or data are read.
#
#   scripts/plan_recipes.sh [--gpu a100-80g|h100-80g|h200]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export LLAMA2_7B=llama2-7b DATA_DIR=data RUN_DIR=runs DEMO_DIR=out/demo
plan() { "$PYTHON" scripts/plan.py "$@" --markdown; }
plan yaml/prune_1.3b.yaml --gpus 8 --header "$@"
plan yaml/prune_2.7b.yaml --gpus 8 "$@"
plan yaml/continue_1.3b.yaml --after yaml/prune_1.3b.yaml --gpus 32 "$@"
plan yaml/continue_2.7b.yaml --after yaml/prune_2.7b.yaml --gpus 32 "$@"
plan yaml/demo/prune.yaml --gpus 1 "$@"
plan yaml/demo/continue.yaml --after yaml/demo/prune.yaml --gpus 1 "$@"
