#!/usr/bin/env bash
# Check a GPU machine end to end in about 10 minutes on one A100/H100/H200; prints one JSON line (see
# scripts/gpu_check.py and docs/recipes.md). --cpu runs the same stages at tiny sizes on the CPU.
#
#   scripts/gpu_check.sh            # PYTHON=... if the environment is not .venv
#   scripts/gpu_check.sh --cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
# Freed tensors go back to the system at once, so the CPU memory stage's resident-set peak counts live tensors.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-65536}"
exec "$PYTHON" scripts/gpu_check.py "$@"
