#!/usr/bin/env bash
# The CPU demo: prune SmolLM2-135M to about a third of its size and continue pre-training it, end to end, offline.
#
#   scripts/demo.sh                 # writes everything under out/demo (DEMO_DIR=... to choose another place)
#   DEMO_DOWNSTREAM_ITEMS=160 scripts/demo.sh   # the last step on all 160 items of demo_continuation (default 80)
#
# corpus -> MDS (SmolLM2 tokenizer) -> source reference losses -> prune -> cut -> continue -> HF export ->
# per-domain perplexity of source / cut / continued -> plots -> downstream accuracy of source / cut / continued
# (lm-eval, our offline task demo_continuation). About 17 minutes on 2 idle CPU cores. A step whose
# output already exists is skipped, so running it again after an interruption picks up where it stopped (the
# training stages resume from their last checkpoint). The same train.py commands with the recipes of yaml/ run
# the full-size pipeline on a GPU cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export DEMO_DIR="${DEMO_DIR:-out/demo}"
mkdir -p "$DEMO_DIR"
STEP=0
step() {
    STEP=$((STEP + 1))
    echo "==> [$STEP/10] $1 ($(date +%H:%M:%S), ${SECONDS}s elapsed)" >&2
}
skip() {
    echo "    $1 exists: skipped" >&2
}

step "demo corpus from this machine's Python sources and docs -> $DEMO_DIR/corpus"
if [ -d "$DEMO_DIR/corpus" ]; then skip "$DEMO_DIR/corpus"; else
    "$PYTHON" scripts/make_demo_corpus.py "$DEMO_DIR/corpus" --max-chars 600000 >/dev/null
fi

step "tokenize with SmolLM2's tokenizer, pack into 256-token MDS sequences -> $DEMO_DIR/data"
if [ -d "$DEMO_DIR/data" ]; then skip "$DEMO_DIR/data"; else
    "$PYTHON" scripts/prepare_data.py --input "$DEMO_DIR/corpus" --tokenizer smollm2 --out "$DEMO_DIR/data" \
        --seq-len 256 --eval-seqs 8 --workers 2 >/dev/null
fi

step "reference losses: SmolLM2-135M's own loss per domain -> $DEMO_DIR/reference_losses.json"
if [ -f "$DEMO_DIR/reference_losses.json" ]; then skip "$DEMO_DIR/reference_losses.json"; else
    "$PYTHON" scripts/reference_loss.py --source smollm2 --data "$DEMO_DIR/data/eval" | tail -n 1 \
        > "$DEMO_DIR/reference_losses.json.partial"
    mv "$DEMO_DIR/reference_losses.json.partial" "$DEMO_DIR/reference_losses.json"
fi

step "prune (L0 masks, exact schedule, 0/1 hardening, dynamic batch loading), yaml/demo/prune.yaml -> $DEMO_DIR/runs/demo_prune"
"$PYTHON" train.py yaml/demo/prune.yaml

step "cut the masked model into a dense HF model -> $DEMO_DIR/pruned"
if [ -d "$DEMO_DIR/pruned" ]; then skip "$DEMO_DIR/pruned"; else
    "$PYTHON" scripts/export_hf.py --checkpoint "$DEMO_DIR/runs/demo_prune/latest-rank0.pt" --out "$DEMO_DIR/pruned" \
        >/dev/null
fi

step "continued pre-training, yaml/demo/continue.yaml -> $DEMO_DIR/runs/demo_continue"
"$PYTHON" train.py yaml/demo/continue.yaml

step "export the continued model as an HF directory -> $DEMO_DIR/final"
if [ -d "$DEMO_DIR/final" ]; then skip "$DEMO_DIR/final"; else
    "$PYTHON" scripts/export_hf.py --checkpoint "$DEMO_DIR/runs/demo_continue/latest-rank0.pt" \
        --out "$DEMO_DIR/final" >/dev/null
fi

step "per-domain perplexity: source, cut, continued -> $DEMO_DIR/perplexity.txt"
"$PYTHON" scripts/eval_ppl.py --model smollm2 --model "$DEMO_DIR/pruned" --model "$DEMO_DIR/final" \
    --data "$DEMO_DIR/data/eval" > "$DEMO_DIR/perplexity.txt"
head -n -1 "$DEMO_DIR/perplexity.txt"

step "plots -> $DEMO_DIR/plots; a sample from the exported model through transformers alone"
"$PYTHON" scripts/plot_run.py "$DEMO_DIR/runs/demo_prune" "$DEMO_DIR/runs/demo_continue" --out "$DEMO_DIR/plots" \
    --overwrite >/dev/null
"$PYTHON" scripts/generate.py --model "$DEMO_DIR/final" --prompt "def read_file(path):"

step "downstream accuracy (lm-eval, held-out passages, true continuation among 4): source, cut, continued -> $DEMO_DIR/downstream.txt"
"$PYTHON" scripts/eval_downstream.py --model smollm2 --model "$DEMO_DIR/pruned" --model "$DEMO_DIR/final" \
    --tasks demo_continuation --limit "${DEMO_DOWNSTREAM_ITEMS:-80}" --batch-size 16 > "$DEMO_DIR/downstream.txt"
head -n -1 "$DEMO_DIR/downstream.txt"
echo "==> done in ${SECONDS}s: $DEMO_DIR/final (HF model), $DEMO_DIR/perplexity.txt, $DEMO_DIR/downstream.txt," \
    "$DEMO_DIR/plots/*.png" >&2
