"""Speed of a compact masked pruning step against the dense one, at three points of a pruning run; one JSON line.

    python scripts/bench_compact.py [--repeats 5]

SmolLM2-135M (the embedded GGUF) pruned towards the demo target (d_model 384, 20 layers, 6 heads / 2 KV heads,
intermediate 1024), batches of 4 x 256 tokens as in the demo, fp32 on 2 CPU threads. Masks at three points of a
pruning run, each the top-k masks of random gate logits (:class:`~llmshear.models.l0.L0Module`):

* ``start``: every unit kept (the first batch);
* ``mid``: about half of what the target removes is removed (d_model 480, 25 layers, 6 heads / 3 KV heads,
  intermediate 1280: halfway along the ramp);
* ``target``: the target shape (after the ramp; the frozen masks of the last 30%).

For each, a training step (forward, cross-entropy, backward, AdamW step) of the dense masked model
(``pruning.compact: false``) and of the compact one, interleaved, after a warm-up step each; and the training step
of the cut model (the target shape without masks), the floor a compact step approaches. Reported: median seconds,
``dense_over_compact`` (the speed-up), the FLOPs the compact step computed over the dense step's
(:func:`~llmshear.costs.active_forward_flops_per_token`), and ``compact_over_cut`` at the target. The JSON line
records the load average: times inflate on a shared machine, ratios much less.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import time

import torch
import torch.nn.functional as F

from llmshear.costs import active_forward_flops_per_token, forward_flops_per_token
from llmshear.models.hf import build_model, load_model
from llmshear.models.l0 import L0Module, TargetShape

THREADS = 2
SOURCE = "smollm2"
BATCH, SEQ_LEN = 4, 256
STATES = {
    "start": None,
    "mid": {"d_model": 480, "n_layers": 25, "n_heads": 6, "n_kv_heads": 3, "intermediate_size": 1280},
    "target": {"d_model": 384, "n_layers": 20, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024},
}


def masks_for(cfg, shape: dict | None) -> dict[str, torch.Tensor]:
    """Top-k masks of random gate logits for ``shape`` (``None``: every unit kept), requiring grad like gates."""
    target = TargetShape.from_dict(shape or STATES["target"], cfg)
    l0 = L0Module(cfg, target)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for log_alpha in l0.log_alpha.values():
            log_alpha.copy_(torch.randn(log_alpha.shape, generator=generator))
        masks = l0.deterministic_masks()
    if shape is None:
        masks = {name: torch.ones_like(mask) for name, mask in masks.items()}
    return {name: mask.detach().requires_grad_() for name, mask in masks.items()}


def train_step(model, optimizer, tokens: torch.Tensor, masks=None, compact: bool = False) -> None:
    logits = model(tokens, masks, compact=compact)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_state(model, cut, tokens: torch.Tensor, shape: dict | None, repeats: int) -> dict:
    """Median seconds of the dense and compact steps (and the cut model's at the target), interleaved."""
    masks = masks_for(model.cfg, shape)
    optimizers = {"dense": torch.optim.AdamW(model.parameters(), lr=1e-7),
                  "compact": torch.optim.AdamW(model.parameters(), lr=1e-7)}
    steps = {variant: (lambda v=variant: train_step(model, optimizers[v], tokens, masks, v == "compact"))
             for variant in optimizers}
    if cut is not None:
        cut_optimizer = torch.optim.AdamW(cut.parameters(), lr=1e-7)
        steps["cut"] = lambda: train_step(cut, cut_optimizer, tokens)
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {variant: [] for variant in steps}
    for _ in range(repeats):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - start)
    seconds = {variant: statistics.median(values) for variant, values in times.items()}
    model(tokens[:1], masks, compact=True)  # the active shape of these masks
    computed = active_forward_flops_per_token(model.cfg, model.active, SEQ_LEN)
    row = {"seconds": {k: round(v, 3) for k, v in seconds.items()},
           "dense_over_compact": round(seconds["dense"] / seconds["compact"], 3),
           "flops_compact_over_dense": round(computed / forward_flops_per_token(model.cfg, SEQ_LEN), 3)}
    if cut is not None:
        row["compact_over_cut"] = round(seconds["compact"] / seconds["cut"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median; default 5)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    model = load_model(SOURCE).train()
    target = TargetShape.from_dict(STATES["target"], model.cfg)
    cut = build_model(dataclasses.replace(model.cfg, **dataclasses.asdict(target)), seed=0).train()
    tokens = torch.randint(0, model.cfg.vocab_size, (BATCH, SEQ_LEN))
    states = {name: time_state(model, cut if name == "target" else None, tokens, shape, args.repeats)
              for name, shape in STATES.items()}
    print(json.dumps({"source": SOURCE, "batch": BATCH, "seq_len": SEQ_LEN, "threads": THREADS,
                      "repeats": args.repeats, "load_avg_1min": [load_before, os.getloadavg()[0]],
                      "wall_s": round(time.perf_counter() - started, 1), **states}))


if __name__ == "__main__":
    main()
