"""Tokens/s of training steps through ``train.py``'s path (Composer) against a bare PyTorch loop; one JSON line last.

    python scripts/bench_train.py [--preset cpu-26m] [--steps 16] [--batch 4] [--seq-len 128] [--threads 2]
    python scripts/bench_train.py --device gpu --precision amp_bf16 [--peak-tflops 989]   # default: sheared-1.3b

Two stages over the same randomly initialised source model (saved as an HF directory in a temporary folder) and
the same synthetic MDS data (three domains of random tokens):

* ``prune``: hard-concrete masks of every structure towards a half-size target, the Lagrangian in the loss;
* ``continue``: the model without masks (a continued-pre-training step).

The Composer path is what ``train.py`` runs: a recipe YAML → :func:`llmshear.config.load` →
:func:`llmshear.builders.build_trainer` (dynamic-loading dataset and callback, pruning and RNG callbacks, JSON-lines
and console loggers, Composer's train metric, LR schedule) → ``Trainer.fit``, with the evaluation and the
checkpoint of the run's last batch. The bare loop builds the same ``ComposerLlama`` (model, L0 module), optimizer
(three parameter groups) and dataloader with the same builders and runs data → forward → loss → backward → step.

A step's time runs from fetching its batch to fetching the next (in Composer: consecutive ``before_dataloader``
events). The first ``--warmup`` steps, the last Composer step (it holds the evaluation and the checkpoint) and the
evaluation are not counted; the evaluation is reported apart (``eval_s``). The bare loop runs half its timed steps
before and half after the Composer run, so that a change of load on a shared machine affects both paths alike.
``ratio`` is Composer's tokens/s over the bare loop's (medians of step times); the goal is ``ratio >= 0.9``.

Model FLOPs per step: ``6·N·tokens`` (N: parameters that multiply, i.e. without the input embedding table) plus
attention ``12·layers·heads·head_dim·seq_len²·batch`` (forward and backward, causality not discounted); on a GPU
``mfu`` divides the achieved rate by ``--peak-tflops`` (default: H100/H200 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from composer.core import Callback, State
from composer.loggers import Logger
from omegaconf import OmegaConf
from streaming import MDSWriter

from llmshear.builders import build_composer_model, build_train_loader, build_trainer
from llmshear.config import RunConfig, load
from llmshear.datasets.mds import TOKENS, token_dtype
from llmshear.models.hf import PRESETS, build_model, save_pretrained
from llmshear.models.llama import LlamaConfig
from llmshear.optim import build_optimizer
from llmshear.resources import train_flops_per_token

log = logging.getLogger("bench_train")

DOMAINS = ["a", "b", "c"]
SAMPLES = {"train": 64, "eval": 4}  # per domain; a domain that runs out starts a new pass
GOAL = 0.9
DEFAULT_PEAK_TFLOPS = 989.0  # H100/H200 SXM, dense bf16
# tokens/s per A100-80GB (STACK_NOTES.md): llm-foundry's 1B at seq 4096; Sheared-LLaMA's own runs
REFERENCE_A100 = {"llm_foundry_1b": 17807, "sheared_continue_1.3b": 8684, "sheared_prune_7b": 1844}
SHAPES: dict[str, Callable[[], LlamaConfig]] = {
    # ~26M parameters: one step of 4 x 128 tokens takes well under a second on 2 cores
    "cpu-26m": lambda: LlamaConfig(vocab_size=8192, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=64,
                                   intermediate_size=1408, max_seq_len=1024),
    # Sheared-LLaMA-1.3B's shape (STACK_NOTES.md), for GPUs
    "sheared-1.3b": lambda: LlamaConfig(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16,
                                        head_dim=128, intermediate_size=5504, max_seq_len=4096),
    **PRESETS,
}
DEFAULTS = {"cpu": {"preset": "cpu-26m", "batch": 4, "seq_len": 128},
            "gpu": {"preset": "sheared-1.3b", "batch": 4, "seq_len": 4096}}


def half_target(cfg: LlamaConfig) -> dict:
    """A pruning target of about half of every dimension, keeping the query heads per KV head (valid GQA)."""
    kv = max(1, cfg.n_kv_heads // 2)
    return {"d_model": max(1, cfg.d_model // 2), "n_layers": max(1, cfg.n_layers // 2), "n_kv_heads": kv,
            "n_heads": kv * cfg.q_per_kv, "intermediate_size": max(1, cfg.intermediate_size // 2)}


def write_data(root: Path, vocab: int, seq_len: int) -> Path:
    """``root/{train,eval}/<domain>`` MDS directories of random token sequences ``(seq_len,)``."""
    rng = np.random.default_rng(0)
    dtype = token_dtype(vocab)
    for split, count in SAMPLES.items():
        for domain in DOMAINS:
            columns = {TOKENS: f"ndarray:{dtype}:{seq_len}"}
            with MDSWriter(out=str(root / split / domain), columns=columns, compression=None) as writer:
                for row in rng.integers(0, vocab, size=(count, seq_len)):
                    writer.write({TOKENS: row.astype(dtype)})
    return root


def write_recipe(folder: Path, stage: str, model_dir: Path, data_dir: Path, source: LlamaConfig,
                 args: argparse.Namespace) -> Path:
    """The stage's recipe: ``warmup + steps + 1`` batches, evaluation (and checkpoint) after the last one only."""
    batches = args.warmup + args.steps + 1
    recipe = {
        "run_name": f"bench_{stage}",
        "model": {"pretrained": str(model_dir)},
        "data": {"path": str(data_dir), "domains": DOMAINS, "seq_len": args.seq_len,
                 "proportions": [1 / len(DOMAINS)] * len(DOMAINS),
                 "reference_losses": [math.log(source.vocab_size)] * len(DOMAINS)},
        "optimizer": {"lr": 1e-4, "lag_lr": 1.0, "clip_norm": 0.0},  # the bare loop does not clip either
        "train": {"max_batches": batches, "global_batch_size": args.batch, "micro_batch_size": args.batch,
                  "eval_interval": batches, "eval_batch_size": args.batch, "log_interval": 1,
                  "precision": args.precision, "device": args.device},
        "checkpoint": {"save_folder": str(folder / stage)},
    }
    if stage == "prune":
        # Every timed step a soft masked step with the Lagrangian in the loss, as the bare loop computes it (no
        # per-batch shift solving, no hardening, no calibration pass, one evaluation).
        recipe["pruning"] = {"target": half_target(source), "constraint": "row", "sparsity_warmup": 1.0,
                             "harden_from": 1.0, "init": "constant", "eval_target": False}
    path = folder / f"{stage}.yaml"
    OmegaConf.save(OmegaConf.create(recipe), path)
    return path


def _now(cuda: bool) -> float:
    """Wall-clock seconds, after the GPU's queued work (if any) has finished."""
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


class StepTimer(Callback):
    """Marks the start of every training step (``before_dataloader``) and times the evaluations."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list[float] = []
        self.eval_s = 0.0
        self.threads = 0
        self._eval_start = 0.0

    def fit_start(self, state: State, logger: Logger) -> None:
        self.threads = torch.get_num_threads()

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self.marks.append(_now(self.cuda))

    def eval_before_all(self, state: State, logger: Logger) -> None:
        self._eval_start = _now(self.cuda)

    def eval_after_all(self, state: State, logger: Logger) -> None:
        self.eval_s += _now(self.cuda) - self._eval_start


def composer_steps(cfg: RunConfig, cuda: bool) -> dict:
    """Fit the recipe as ``train.py`` does; step times between consecutive batch fetches (the last step excluded)."""
    timer = StepTimer(cuda)
    trainer = build_trainer(cfg)
    trainer.state.callbacks.append(timer)  # after the builders: the run is exactly train.py's plus this probe
    trainer.fit()
    trainer.close()
    del trainer
    gc.collect()
    return {"step_s": np.diff(timer.marks).tolist(), "eval_s": timer.eval_s, "threads": timer.threads}


class BareLoop:
    """The same model, optimizer groups and batches as the recipe, trained by a plain PyTorch loop."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.device = device
        self.model = build_composer_model(cfg).to(device).train()
        o = cfg.optimizer
        self.optimizer = build_optimizer(self.model, lr=o.lr, lag_lr=o.lag_lr, betas=o.betas, eps=o.eps,
                                         weight_decay=o.weight_decay)
        self.batches: Iterator[dict] = iter(build_train_loader(cfg, world_size=1))
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "amp_bf16")
        self.step = 0

    def run(self, steps: int) -> list[float]:
        """Seconds of each of ``steps`` steps, each from fetching its batch to the end of the optimizer step."""
        cuda = self.device.type == "cuda"
        marks = [_now(cuda)]
        for _ in range(steps):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.batches).items()}
            if self.model.l0 is not None:
                self.model.l0.set_step(self.step)
            with self.autocast:
                loss = self.model.loss(self.model(batch), batch)["total"]
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            marks.append(_now(cuda))
        return np.diff(marks).tolist()


def summary(step_s: list[float], tokens: int, flops: float, peak_tflops: float | None) -> dict:
    """Median and mean step time, tokens/s and model TFLOP/s at the median (and MFU given a peak)."""
    median = statistics.median(step_s)
    out = {"steps": len(step_s), "median_step_s": round(median, 4), "mean_step_s": round(statistics.mean(step_s), 4),
           "tokens_per_s": round(tokens / median, 1), "model_tflops_per_s": round(flops / median / 1e12, 4)}
    if peak_tflops:
        out["mfu"] = round(flops / median / (peak_tflops * 1e12), 4)
    return out


def model_flops_per_step(cfg: LlamaConfig, batch: int, seq_len: int) -> float:
    """``6·N·tokens`` plus attention ``12·layers·heads·head_dim·seq_len²·batch`` (see the module docstring)."""
    return train_flops_per_token(cfg, seq_len) * batch * seq_len


def bench_stage(recipe: Path, args: argparse.Namespace, flops: float) -> dict:
    """Bare loop (first half) → Composer run → bare loop (second half); summaries and the ratio."""
    cfg = load(recipe)
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    bare = BareLoop(cfg, device)
    first = args.steps // 2
    bare_s = bare.run(args.warmup + first)[args.warmup:]
    composer = composer_steps(load(recipe), device.type == "cuda")
    bare_s += bare.run(args.warmup + args.steps - first)[args.warmup:]
    del bare
    gc.collect()
    tokens = args.batch * args.seq_len
    result = {"bare": summary(bare_s, tokens, flops, args.peak_tflops),
              "composer": {**summary(composer["step_s"][args.warmup:], tokens, flops, args.peak_tflops),
                           "eval_s": round(composer["eval_s"], 3), "threads": composer["threads"]}}
    result["ratio"] = round(result["composer"]["tokens_per_s"] / result["bare"]["tokens_per_s"], 3)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "amp_bf16"), default="fp32")
    parser.add_argument("--preset", choices=sorted(SHAPES), help="model shape (default: cpu-26m / sheared-1.3b)")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per path and stage")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps of every run (and bare half)")
    parser.add_argument("--batch", type=int, help="sequences per step (default: 4)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: 128 on cpu, 4096 on gpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, help=f"peak of the GPU for the MFU (gpu default: "
                        f"{DEFAULT_PEAK_TFLOPS}, dense bf16 H100/H200 SXM)")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "gpu" and args.peak_tflops is None:
        args.peak_tflops = DEFAULT_PEAK_TFLOPS
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu: no CUDA device is available")
    if args.device == "cpu" and args.precision != "fp32":
        parser.error("--precision amp_bf16 needs --device gpu (Composer rejects it on CPU)")
    if args.steps < 2 or args.warmup < 1:
        parser.error("--steps must be at least 2 and --warmup at least 1")
    return args


def run(args: argparse.Namespace) -> dict:
    """Both stages in a temporary folder; the JSON report."""
    source = SHAPES[args.preset]()
    source = dataclasses.replace(source, max_seq_len=max(source.max_seq_len, args.seq_len))
    flops = model_flops_per_step(source, args.batch, args.seq_len)
    result = {"device": args.device, "precision": args.precision, "threads": args.threads,
              "cpu_count": os.cpu_count(), "preset": args.preset, "params": None, "batch": args.batch,
              "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "goal": GOAL}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        folder = Path(tmp)
        model = build_model(source, seed=0)
        result["params"] = model.num_params()
        model_dir = save_pretrained(model, folder / "model")
        del model
        data_dir = write_data(folder / "data", source.vocab_size, args.seq_len)
        for stage in ("prune", "continue"):
            result[stage] = bench_stage(write_recipe(folder, stage, model_dir, data_dir, source, args), args, flops)
            shutil.rmtree(folder / stage)  # the run's checkpoint (on a GPU, tens of GB with the optimizer state)
            log.info("%s: %s", stage, result[stage])
    result["goals_met"] = {stage: result[stage]["ratio"] >= GOAL for stage in ("prune", "continue")}
    if args.device == "gpu":
        result["reference_a100_tokens_per_s"] = REFERENCE_A100
        result["continue_vs_llm_foundry_1b"] = round(
            result["continue"]["composer"]["tokens_per_s"] / REFERENCE_A100["llm_foundry_1b"], 3)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON line alone
        result = run(args)
    # The load average tells whether other processes shared the cores (absolute times then inflate).
    result["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
