"""Benchmark our model against Hugging Face's on CPU, fp32, 2 threads; prints one JSON line last.

    python scripts/bench_model.py [--cases tiny smollm2] [--repeats N]
    python scripts/bench_model.py --device gpu --cases 1b [--peak-tflops 989]    # bf16 autocast, one GPU

For a tiny MHA config (``tiny-llama2``) and for SmolLM2-135M (real weights from ``smollm2``, GQA 9/3):

* training step (forward, cross-entropy, backward, AdamW step) of ours without masks, ours with all-ones masks of
  every structure (``layer``, ``kv_group``, ``head``, ``intermediate``, ``hidden``; leaf tensors that require grad,
  as gates do while pruning) and HF ``LlamaForCausalLM`` with the same weights;
* forward (no grad) of a *cut* model, i.e. ours built at a smaller config (for SmolLM2 the demo target: d_model 384,
  20 layers, 6 heads / 2 KV heads, intermediate 1024), against HF's model of that config and weights.

Times are medians over several runs (21 for tiny, 5 for SmolLM2; ``--repeats N`` overrides; five times as many for
the cheap forward-only cut variants) after one warm-up,
with the variants of a case interleaved so that load from other processes affects them alike (the JSON records the
load average: on a shared machine absolute times inflate, ratios much less). Peak memory is the peak increase of
the resident set size (RSS, sampled every millisecond) during one step of one variant, each in a fresh process so
that memory freed by another variant is not reused.
With ``--device gpu`` every variant runs on the GPU under bf16 autocast, peak memory is
``torch.cuda.max_memory_allocated`` above what was allocated before the step (in this process), and the
training variants also report tokens/s and MFU (FLOPs as :func:`llmshear.costs.train_flops_per_token`,
over ``--peak-tflops``). The ``1b`` case is a random model of Sheared-LLaMA-1.3B's shape (GPU only).
HF uses its default attention (SDPA; for GQA on CPU it passes ``enable_gqa``, which takes PyTorch's math kernel,
while ours repeats K/V heads and gets the faster fused kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmshear.costs import train_flops_per_token
from llmshear.models.hf import PRESETS, build_model, config_to_hf, load_config, load_model, save_pretrained
from llmshear.models.l0 import mask_shapes
from llmshear.models.llama import LlamaConfig

THREADS = 2
DEVICE = {"cpu": "cpu", "gpu": "cuda"}
DEFAULT_PEAK_TFLOPS = 989.0  # H100/H200 SXM, dense bf16


@dataclasses.dataclass(frozen=True)
class Case:
    """What one benchmark case runs: the source, the input ``(batch, seq_len)``, timed repeats, the cut shape."""

    source: str
    batch: int
    seq_len: int
    repeats: int
    cut_shape: dict


CASES = {
    "tiny": Case("tiny-llama2", 4, 64, 21, {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2,
                                            "intermediate_size": 88}),
    "smollm2": Case("smollm2", 2, 128, 5, {"d_model": 384, "n_layers": 20, "n_heads": 6, "n_kv_heads": 2,
                                           "intermediate_size": 1024}),
    "1b": Case("sheared-llama-1.3b", 2, 2048, 5, {"d_model": 1024, "n_layers": 12, "n_heads": 8, "n_kv_heads": 8,
                                                   "intermediate_size": 2752}),
}
VARIANTS = ("ours", "ours_masked", "hf", "cut_ours", "cut_hf")
GOALS = {"masked_over_unmasked": 1.15, "ours_over_hf": 1.0, "cut_over_hf": 1.02}
# Cut variants are forward passes only, several times cheaper than a training step: time them this many times per
# round (still interleaved) so that a burst of load from another process moves their median less.
CUT_SAMPLES = 5


def ones_masks(cfg: LlamaConfig, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All-ones masks of every structure, shapes as documented in ``llama.py``, requiring grad like real gates."""
    return {name: torch.ones(shape, requires_grad=True, device=device) for name, shape in mask_shapes(cfg).items()}


def train_step(model, tokens: torch.Tensor, optimizer, masks=None, hf: bool = False) -> None:
    """Next-token cross-entropy, backward, AdamW step; ``tokens`` ``(B, T)``; bf16 autocast on a GPU."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=tokens.is_cuda):
        logits = model(tokens, use_cache=False).logits if hf else model(tokens, masks)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _hf_like(model) -> torch.nn.Module:
    """HF's model of ``model``'s config with the same weights."""
    hf = AutoModelForCausalLM.from_config(config_to_hf(model.cfg), dtype=torch.float32)
    hf.load_state_dict(model.state_dict())
    return hf


def make_variant(variant: str, case: str, model_dir: Path, device: str = "cpu") -> Callable[[], object]:
    """A closure running one step of ``variant`` on ``case``; models and inputs are built here, not timed."""
    spec = CASES[case]
    torch.manual_seed(0)
    cfg = load_config(model_dir)
    tokens = torch.randint(0, cfg.vocab_size, (spec.batch, spec.seq_len)).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    if variant.startswith("cut_"):
        cut = build_model(dataclasses.replace(cfg, **spec.cut_shape), seed=0).eval()
        model = (_hf_like(cut) if variant == "cut_hf" else cut).eval().to(device)
        kwargs = {"use_cache": False} if variant == "cut_hf" else {}
        return torch.no_grad()(autocast(lambda: model(tokens, **kwargs)))
    if variant == "hf":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train().to(device)
    else:
        model = load_model(model_dir).train().to(device)
    masks = ones_masks(cfg, device) if variant == "ours_masked" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    return lambda: train_step(model, tokens, optimizer, masks, hf=variant == "hf")


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def time_case(case: str, model_dir: Path, repeats: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds per step of every variant, run interleaved after one warm-up step each."""
    steps = {variant: make_variant(variant, case, model_dir, device) for variant in VARIANTS}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {variant: [] for variant in steps}
    for _ in range(repeats):
        for variant, step in steps.items():
            for _ in range(CUT_SAMPLES if variant.startswith("cut_") else 1):
                start = _now(device)
                step()
                times[variant].append(_now(device) - start)
    return {variant: statistics.median(values) for variant, values in times.items()}


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_step_memory_mib(step: Callable[[], object]) -> float:
    """Peak RSS increase while ``step`` runs (RSS sampled every millisecond on a thread; Linux)."""
    before, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    done.set()
    sampler.join()
    return max(peak[0], _rss_mib()) - before


def memory_in_fresh_process(case: str, variant: str, model_dir: Path) -> float:
    """Run one step of one variant in a new process (nothing freed earlier is reused) and return its peak MiB."""
    command = [sys.executable, __file__, "--memory-of", case, variant, str(model_dir)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def gpu_memory_mib(case: str, variant: str, model_dir: Path) -> float:
    """Peak GPU memory above what was allocated before one step of ``variant`` (after a warm-up step)."""
    step = make_variant(variant, case, model_dir, "cuda")
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def throughput(case: str, model_dir: Path, seconds: dict[str, float], peak_tflops: float) -> dict:
    """Tokens/s and MFU of the training variants (GPU runs)."""
    spec, cfg = CASES[case], load_config(model_dir)
    tokens = spec.batch * spec.seq_len
    rates = {v: tokens / seconds[v] for v in ("ours", "ours_masked", "hf")}
    flops = train_flops_per_token(cfg, spec.seq_len)
    return {"tokens_per_s": {v: round(r) for v, r in rates.items()},
            "mfu": {v: round(r * flops / (peak_tflops * 1e12), 3) for v, r in rates.items()}}


def bench_case(case: str, workdir: Path, repeats: int | None, device: str = "cpu",
               peak_tflops: float = DEFAULT_PEAK_TFLOPS) -> dict:
    """Times, ratios and peak memory of one case; the source is saved to ``workdir`` as an HF directory first."""
    spec = CASES[case]
    model = build_model(PRESETS[spec.source](), seed=0) if spec.source in PRESETS else load_model(spec.source)
    model_dir = save_pretrained(model, workdir / case)
    del model
    seconds = time_case(case, model_dir, repeats or spec.repeats, device)
    if device == "cuda":
        memory = {variant: round(gpu_memory_mib(case, variant, model_dir), 1) for variant in VARIANTS}
        extra = throughput(case, model_dir, seconds, peak_tflops)
    else:
        memory = {variant: round(memory_in_fresh_process(case, variant, model_dir), 1) for variant in VARIANTS}
        extra = {}
    return {
        **dataclasses.asdict(spec), "repeats": repeats or spec.repeats, **extra,
        "seconds": {variant: round(value, 4) for variant, value in seconds.items()},
        "masked_over_unmasked": round(seconds["ours_masked"] / seconds["ours"], 3),
        "ours_over_hf": round(seconds["ours"] / seconds["hf"], 3),
        "cut_over_hf": round(seconds["cut_ours"] / seconds["cut_hf"], 3),
        "peak_mib": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, help="timed steps per variant (median reported); default per case")
    parser.add_argument("--cases", nargs="*", choices=list(CASES), help="default: tiny smollm2 (cpu), 1b (gpu)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="GPU peak for the MFU")
    parser.add_argument("--memory-of", nargs=3, metavar=("CASE", "VARIANT", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu: no GPU is visible")
    device = DEVICE[args.device]
    cases_run = args.cases or (["1b"] if device == "cuda" else ["tiny", "smollm2"])
    torch.set_num_threads(THREADS)
    if args.memory_of:
        case, variant, model_dir = args.memory_of
        print(json.dumps({"peak_mib": peak_step_memory_mib(make_variant(variant, case, Path(model_dir)))}))
        return
    logging.basicConfig(level=logging.WARNING)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        cases = {case: bench_case(case, Path(workdir), args.repeats, device, args.peak_tflops) for case in cases_run}
    met = {f"{case}.{key}": cases[case][key] <= goal for case in cases for key, goal in GOALS.items()}
    # The load average tells whether other processes shared the cores (times then are inflated and noisier).
    memory = "peak allocated above the step's start, bf16 autocast" if device == "cuda" else \
        "peak RSS increase during one step, fresh process per variant"
    print(json.dumps({"device": args.device, "dtype": "bfloat16" if device == "cuda" else "float32",
                      "threads": THREADS, "cpu_count": os.cpu_count(),
                      "load_avg_1min": [load_before, os.getloadavg()[0]], "memory": memory, "goals": GOALS,
                      "goals_met": met, "wall_s": round(time.perf_counter() - start, 1), **cases}))


if __name__ == "__main__":
    main()
