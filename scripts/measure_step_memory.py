"""Peak memory of one training step (forward, backward, AdamW) measured against the planner's estimate.

    python scripts/measure_step_memory.py [--preset tiny-llama2] [--batch 4] [--seq-len 256] [--masked]
    python scripts/measure_step_memory.py --device gpu --preset sheared-llama-1.3b --batch 2 --seq-len 4096 --masked

Builds the model (with an L0 module towards a half-size target when ``--masked``) and the run's optimizer,
takes one step to create the Adam state, then measures a second step. On a GPU the peak is
``torch.cuda.max_memory_allocated`` (bf16 autocast); on the CPU it is the resident-set high-water mark
(``VmHWM``, reset before the step through ``/proc/self/clear_refs``) above the resident set before the model
was built, fp32; run it with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the system (the
estimate counts live tensors). Prints one JSON line: measured and estimated bytes and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from llmshear.costs import StepShape, step_memory
from llmshear.models.build import PRESETS, build_model
from llmshear.models.composer_llama import ComposerLlama
from llmshear.models.hf import load_config
from llmshear.models.l0 import L0Module, TargetShape
from llmshear.models.llama import LlamaConfig
from llmshear.optim import build_optimizer

STATUS = Path("/proc/self/status")


def resident(field: str = "VmRSS") -> int:
    """A ``/proc/self/status`` memory field in bytes (Linux)."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in {STATUS}")


def half_target(cfg: LlamaConfig) -> TargetShape:
    """Every structure at about half its size, whole KV groups kept."""
    heads = max(cfg.n_kv_heads, cfg.n_heads // 2 // cfg.n_kv_heads * cfg.n_kv_heads)
    return TargetShape.from_dict({"d_model": cfg.d_model // 2, "n_layers": max(1, cfg.n_layers // 2),
                                  "n_heads": heads, "n_kv_heads": cfg.n_kv_heads,
                                  "intermediate_size": cfg.intermediate_size // 2}, cfg)


def one_step(model: ComposerLlama, optimizer, batch: dict, precision: torch.dtype | None) -> None:
    with torch.autocast("cuda", dtype=precision, enabled=precision is not None):
        loss = model.loss(model(batch), batch)["total"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(cfg: LlamaConfig, batch_size: int, seq_len: int, masked: bool, device: str) -> dict:
    """Measured and estimated peak bytes of the second of two steps."""
    gpu = device == "gpu"
    before = torch.cuda.memory_allocated() if gpu else resident()
    lm = build_model(cfg, device="cuda" if gpu else "cpu", seed=0)
    l0 = L0Module(cfg, half_target(cfg)).to(lm.model.embed_tokens.weight.device) if masked else None
    model = ComposerLlama(lm, l0=l0).train()
    optimizer = build_optimizer(model, lr=1e-4, lag_lr=0.1)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=lm.model.embed_tokens.weight.device)
    batch = {"input_ids": ids, "labels": ids.clone()}
    precision = torch.bfloat16 if gpu else None
    one_step(model, optimizer, batch, precision)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    one_step(model, optimizer, batch, precision)
    peak = (torch.cuda.max_memory_allocated() if gpu else resident("VmHWM")) - before
    gates = sum(p.numel() for p in l0.parameters()) if l0 is not None else 0
    buffers = sum(b.numel() for b in l0.buffers()) if l0 is not None else 0
    # autocast without FSDP keeps fp32 weights and residual stream: fp32 activations are the closer model
    estimate = step_memory(cfg, StepShape(batch_size, seq_len, masked=masked), gates, buffers).peak
    return {"device": device, "params": lm.num_params(), "batch": batch_size, "seq_len": seq_len, "masked": masked,
            "measured_bytes": peak, "estimated_bytes": estimate, "ratio": estimate / peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llama2", help=f"one of {sorted(PRESETS)} or an HF directory")
    parser.add_argument("--shape", nargs="*", default=[], metavar="KEY=INT",
                        help="replace fields of the preset's shape (d_model=256 n_layers=4 ...)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--masked", action="store_true", help="the pruning step (L0 masks) instead of a plain one")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu: no GPU is visible")
    try:
        cfg = dataclasses.replace(load_config(args.preset), **{k: int(v) for k, v in
                                                               (item.split("=", 1) for item in args.shape)})
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"--preset {args.preset} --shape {args.shape}: {err}")
    print(json.dumps(measure(cfg, args.batch, args.seq_len, args.masked, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
