"""Resources a recipe needs, before anything is downloaded: GPU and host memory, disk, FLOPs and hours.

The recipe is read as ``train.py`` reads it (:func:`llmshear.config.load`, same overrides and checks) except
for the checks of files that do not exist yet (data, checkpoints, ``*_from`` files); only the source's (and
the teacher's) ``config.json`` is read. :mod:`llmshear.costs` holds the arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmshear.config import RunConfig, load
from llmshear.costs import FP32, StepShape, non_embedding_params, step_memory, total_params, train_flops_per_token
from llmshear.datasets.mds import token_dtype
from llmshear.models.hf import config_to_hf, load_config
from llmshear.models.l0 import L0Module, TargetShape
from llmshear.models.llama import DTYPES, LlamaConfig

GIB = 2**30
# GPU memory as the driver reports it, and dense bf16 peak FLOP/s (vendor data sheets, SXM parts).
GPUS = {"a100-80g": (81920 * 2**20, 312e12), "h100-80g": (81559 * 2**20, 989e12),
        "h200": (143771 * 2**20, 989e12)}
RESERVED = 3 * GIB  # CUDA context, NCCL buffers and allocator fragmentation, kept free of the budget
# Sheared-LLaMA's reported tokens/s per A100-80GB (Xia et al. 2023, appendix) for each stage: source, seq len.
PAPER_THROUGHPUT = {"prune": ("llama2-7b", 4096, 1844.0), "continue": ("sheared-llama-1.3b", 4096, 8684.0)}


def paper_mfu(stage: str) -> float:
    """The MFU that the paper's A100 throughput of ``stage`` implies with our FLOPs formula."""
    source, seq_len, tokens_per_s = PAPER_THROUGHPUT[stage]
    return tokens_per_s * train_flops_per_token(load_config(source), seq_len) / GPUS["a100-80g"][1]


@contextmanager
def cut_source(prune_recipe: str, env_overrides: list[str]):
    """An HF directory holding only the ``config.json`` of ``prune_recipe``'s cut model (yields its path)."""
    cfg = load(prune_recipe, env_overrides, cuda=True, files=False)
    if cfg.pruning is None:
        raise ValueError(f"--after {prune_recipe}: not a pruning recipe (it has no pruning section)")
    source = load_config(cfg.model.pretrained)
    target = TargetShape.from_dict(cfg.pruning.target, source, cfg.pruning.structures).to_config(source)
    with tempfile.TemporaryDirectory() as directory:
        config_to_hf(target).save_pretrained(directory)
        yield directory


ENV_REFERENCE = re.compile(r"\$\{oc\.env:([A-Za-z_]\w*)\}")


@contextmanager
def placeholder_environment(*recipes: str) -> Iterator[list[str]]:
    """Set the environment variables the ``recipes`` read (``${oc.env:NAME}``) but that are unset to ``<NAME>``
    for the duration, and yield their names: a plan reads neither data nor run folders, so ``DATA_DIR`` and
    ``RUN_DIR`` need no value (a source named by one still does, or ``--source``)."""
    names = sorted({name for recipe in recipes for name in ENV_REFERENCE.findall(Path(recipe).read_text())
                    if name not in os.environ})
    os.environ.update({name: f"<{name}>" for name in names})
    try:
        yield names
    finally:
        for name in names:
            os.environ.pop(name, None)


def load_recipe(recipe: str, overrides: list[str], gpus: int, source: str | None = None) -> RunConfig:
    """The recipe as train.py validates it for ``gpus`` processes, without its file checks."""
    extra = [f"model.pretrained={source}"] if source else []
    return load(recipe, list(overrides) + extra, world_size=gpus, cuda=True, files=False)


@dataclass(frozen=True)
class Machine:
    """Where the run goes: GPU kind, how many, per node; the MFU assumed and where it comes from."""

    gpu: str = "a100-80g"
    gpus: int = 8
    gpus_per_node: int = 8
    mfu: float | None = None


def gate_counts(cfg: RunConfig, source: LlamaConfig) -> tuple[int, int]:
    """Parameters (gate logits, multipliers) and buffers (hard masks, shifts) of the run's L0 module."""
    if cfg.pruning is None:
        return 0, 0
    p = cfg.pruning
    l0 = L0Module(source, TargetShape.from_dict(p.target, source, p.structures), p.structures,
                  constraint=p.constraint)
    return sum(x.numel() for x in l0.parameters()), sum(x.numel() for x in l0.buffers())


def step_shape(cfg: RunConfig, gpus: int, micro_batch: int, checkpointing: bool) -> StepShape:
    """The run's step: bf16 activations when FSDP's mixed precision casts the weights, else fp32."""
    f = cfg.fsdp
    bf16 = cfg.train.precision != "fp32" and f.enabled and f.mixed_precision != "FULL"
    return StepShape(micro_batch, cfg.data.seq_len, world_size=gpus, sharded=f.enabled, act_bytes=2 if bf16 else 4,
                     masked=cfg.pruning is not None, checkpointing=checkpointing)


def memory_of(cfg: RunConfig, source: LlamaConfig, teacher: LlamaConfig | None, gpus: int, micro_batch: int,
              checkpointing: bool, gates: tuple[int, int]):
    """:func:`step_memory` of the run at ``micro_batch``, with or without activation checkpointing."""
    return step_memory(source, step_shape(cfg, gpus, micro_batch, checkpointing), *gates, teacher=teacher,
                       teacher_bytes=teacher_bytes(cfg))


def teacher_bytes(cfg: RunConfig) -> int:
    """Bytes per teacher weight (``distill.dtype``)."""
    return DTYPES[cfg.distill.dtype].itemsize if cfg.distill is not None else FP32


def largest_micro_batch(cfg: RunConfig, source, teacher, machine: Machine, gates) -> int:
    """The largest micro batch dividing the per-GPU batch that fits the GPU (0: not even 1 fits)."""
    budget = GPUS[machine.gpu][0] - RESERVED
    per_gpu = cfg.train.global_batch_size // machine.gpus
    fits = [m for m in range(1, per_gpu + 1) if per_gpu % m == 0 and memory_of(
        cfg, source, teacher, machine.gpus, m, cfg.fsdp.activation_checkpointing, gates).peak <= budget]
    return max(fits, default=0)


def stage_tokens(cfg: RunConfig) -> dict[str, int]:
    """Tokens of each phase: pruning runs ramp the sparsity, then hold it, then train hardened masks."""
    per_batch = cfg.train.global_batch_size * cfg.data.seq_len
    batches = cfg.train.max_batches
    if cfg.pruning is None:
        return {"continue": batches * per_batch}
    ramp = round(cfg.pruning.sparsity_warmup * batches)
    hard = batches if cfg.pruning.harden_from >= 1 else round(cfg.pruning.harden_from * batches)
    return {"sparsity_ramp": ramp * per_batch, "masked": (hard - ramp) * per_batch,
            "hardened": (batches - hard) * per_batch}


def checkpoints_kept(cfg: RunConfig) -> int:
    """Checkpoints on disk at the end: one per ``save_interval`` and the last, at most ``keep`` (-1: all)."""
    c, batches = cfg.checkpoint, cfg.train.max_batches
    interval = c.save_interval or batches
    written = batches // interval + (1 if batches % interval else 0)
    return written if c.keep < 0 else min(c.keep, written)


def disk(cfg: RunConfig, source: LlamaConfig, gates: tuple[int, int]) -> dict[str, float]:
    """Bytes of one checkpoint (fp32 weights + AdamW states, the L0 module's), of the kept ones, of the MDS data."""
    checkpoint = 3 * FP32 * total_params(source) + 3 * FP32 * gates[0] + FP32 * gates[1]
    tokens = sum(stage_tokens(cfg).values())
    return {"checkpoint_gb": checkpoint / 1e9, "checkpoints_kept": checkpoints_kept(cfg),
            "checkpoints_disk_gb": checkpoint * checkpoints_kept(cfg) / 1e9,
            "mds_disk_gb": tokens * np.dtype(token_dtype(source.vocab_size)).itemsize / 1e9}


def hours(cfg: RunConfig, flops_per_token: float, machine: Machine) -> dict:
    """Wall-clock hours at the machine's MFU (default: the paper's throughput for the stage, see PAPER_THROUGHPUT)."""
    stage = "continue" if cfg.pruning is None else "prune"
    mfu = machine.mfu if machine.mfu is not None else paper_mfu(stage)
    why = "--mfu" if machine.mfu is not None else (
        f"Sheared-LLaMA's {PAPER_THROUGHPUT[stage][2]:.0f} tokens/s per A100 ({stage}, {PAPER_THROUGHPUT[stage][0]})")
    rate = machine.gpus * GPUS[machine.gpu][1] * mfu
    return {"mfu": round(mfu, 3), "mfu_source": why,
            "hours": sum(stage_tokens(cfg).values()) * flops_per_token / rate / 3600}


def host_memory(cfg: RunConfig, source: LlamaConfig, teacher: LlamaConfig | None, machine: Machine) -> float:
    """Bytes of host memory per node while the model loads: an fp32 copy per loading rank (every rank with
    ``model.init_device=cpu``, rank 0 only with ``meta``), plus the teacher (in ``distill.dtype``) on every rank."""
    ranks = min(machine.gpus, machine.gpus_per_node)
    loading = ranks if cfg.model.init_device == "cpu" else 1
    teachers = teacher_bytes(cfg) * ranks * total_params(teacher) if teacher is not None else 0
    return FP32 * loading * total_params(source) + teachers


def gpu_memory(cfg, source, teacher, machine: Machine, gates) -> dict:
    """Per-GPU memory of the recipe's micro batch with and without activation checkpointing, in GiB."""
    micro = cfg.train.micro_batch_size
    on, off = (memory_of(cfg, source, teacher, machine.gpus, micro, ckpt, gates) for ckpt in (True, False))
    chosen = on if cfg.fsdp.activation_checkpointing else off
    budget = GPUS[machine.gpu][0] - RESERVED
    return {"weights_gib": chosen.weights / GIB, "grads_gib": chosen.grads / GIB, "adam_gib": chosen.adam / GIB,
            "gates_gib": chosen.gates / GIB, "fsdp_gathered_gib": chosen.gathered / GIB,
            "teacher_gib": chosen.teacher / GIB, "activations_ckpt_gib": on.activations / GIB,
            "activations_no_ckpt_gib": off.activations / GIB, "peak_gib": chosen.peak / GIB,
            "peak_other_ckpt_gib": (off if chosen is on else on).peak / GIB, "budget_gib": budget / GIB,
            "fits": chosen.peak <= budget,
            "largest_micro_batch": largest_micro_batch(cfg, source, teacher, machine, gates)}


def plan(cfg: RunConfig, machine: Machine, recipe: str = "") -> dict:
    """Everything the planner reports about a validated recipe on ``machine`` (one flat-ish JSON object)."""
    source = load_config(cfg.model.pretrained)
    teacher = load_config(cfg.distill.teacher) if cfg.distill is not None else None
    target = source
    if cfg.pruning is not None:
        target = TargetShape.from_dict(cfg.pruning.target, source, cfg.pruning.structures).to_config(source)
    gates = gate_counts(cfg, source)
    seq = cfg.data.seq_len
    step_flops = train_flops_per_token(source, seq, teacher)
    return {
        "recipe": recipe, "run_name": cfg.run_name, "gpu": machine.gpu, "gpus": machine.gpus,
        "source_params": total_params(source), "source_non_embedding_params": non_embedding_params(source),
        "target_params": total_params(target), "target_non_embedding_params": non_embedding_params(target),
        "step_flops_per_token": step_flops, "cut_flops_per_token": train_flops_per_token(target, seq),
        "micro_batch": cfg.train.micro_batch_size, "seq_len": seq,
        "activation_checkpointing": cfg.fsdp.activation_checkpointing, "fsdp": cfg.fsdp.enabled,
        "tokens": sum(stage_tokens(cfg).values()), "stage_tokens": stage_tokens(cfg),
        **gpu_memory(cfg, source, teacher, machine, gates),
        "host_load_gb_per_node": host_memory(cfg, source, teacher, machine) / 1e9,
        **disk(cfg, source, gates), **hours(cfg, step_flops, machine),
    }


def warnings(result: dict) -> list[str]:
    """What would stop the run: a micro batch that does not fit, with the largest that does."""
    if result["fits"]:
        return []
    best = result["largest_micro_batch"]
    advice = (f"the largest that fits is train.micro_batch_size={best}" if best else
              "not even a micro batch of 1 fits: use more GPUs, activation checkpointing or a larger GPU")
    return [f"train.micro_batch_size={result['micro_batch']} needs {result['peak_gib']:.1f} GiB per GPU, "
            f"{result['gpu']} offers {result['budget_gib']:.1f} GiB; {advice}"]


def _billions(n: float) -> str:
    return f"{n / 1e9:.2f}B"


def _count(n: float) -> str:
    """``4.19e8`` → ``419M``, ``6.1e4`` → ``61.4K``."""
    scale, unit = next(((s, u) for s, u in ((1e9, "B"), (1e6, "M"), (1e3, "K")) if n >= s), (1, ""))
    return f"{n / scale:.3g}{unit}"


ROWS = [("parameters source / target", lambda r: f"{_billions(r['source_params'])} / {_billions(r['target_params'])}"),
        ("non-embedding source / target", lambda r: f"{_billions(r['source_non_embedding_params'])} / "
                                                    f"{_billions(r['target_non_embedding_params'])}"),
        ("train GFLOPs/token step / cut", lambda r: f"{r['step_flops_per_token'] / 1e9:.1f} / "
                                                    f"{r['cut_flops_per_token'] / 1e9:.1f}"),
        ("tokens", lambda r: ", ".join(f"{k} {_count(v)}" for k, v in r["stage_tokens"].items())),
        ("GPU GiB weights / grads / Adam / gates", lambda r: f"{r['weights_gib']:.2f} / {r['grads_gib']:.2f} / "
                                                             f"{r['adam_gib']:.2f} / {r['gates_gib']:.3f}"),
        ("GPU GiB gathered / teacher", lambda r: f"{r['fsdp_gathered_gib']:.2f} / {r['teacher_gib']:.2f}"),
        ("GPU GiB activations ckpt / none", lambda r: f"{r['activations_ckpt_gib']:.2f} / "
                                                      f"{r['activations_no_ckpt_gib']:.2f}"),
        ("GPU GiB peak (budget)", lambda r: f"{r['peak_gib']:.1f} ({r['budget_gib']:.1f}), largest micro batch "
                                            f"{r['largest_micro_batch']}"),
        ("host GB per node at load", lambda r: f"{r['host_load_gb_per_node']:.1f}"),
        ("checkpoint GB x kept = disk", lambda r: f"{r['checkpoint_gb']:.2f} x {r['checkpoints_kept']} = "
                                                  f"{r['checkpoints_disk_gb']:.1f}"),
        ("MDS disk GB", lambda r: f"{r['mds_disk_gb']:.2f}"),
        ("hours", lambda r: f"{r['hours']:.1f} at MFU {r['mfu']} ({r['mfu_source']})")]


def table(result: dict) -> str:
    """A two-column text table of the plan."""
    head = f"{result['recipe'] or result['run_name']} on {result['gpus']} x {result['gpu']}, micro batch " \
           f"{result['micro_batch']} x {result['seq_len']}"
    width = max(len(name) for name, _ in ROWS)
    return "\n".join([head] + [f"  {name:<{width}}  {cell(result)}" for name, cell in ROWS])


MARKDOWN_COLUMNS = ["recipe", "GPUs", "params (source → target)", "GFLOPs/token (step / cut)", "tokens",
                    "GiB/GPU peak (ckpt / none)", "largest micro batch", "host GB/node", "checkpoints GB",
                    "MDS GB", "hours (MFU)"]


def markdown_row(r: dict) -> str:
    cells = [f"`{r['recipe']}`", f"{r['gpus']} × {r['gpu']}",
             f"{_billions(r['source_params'])} → {_billions(r['target_params'])}",
             f"{r['step_flops_per_token'] / 1e9:.1f} / {r['cut_flops_per_token'] / 1e9:.1f}",
             _count(r["tokens"]),
             f"{r['peak_gib'] if r['activation_checkpointing'] else r['peak_other_ckpt_gib']:.1f} / "
             f"{r['peak_other_ckpt_gib'] if r['activation_checkpointing'] else r['peak_gib']:.1f}",
             f"{r['largest_micro_batch']} (recipe {r['micro_batch']})", f"{r['host_load_gb_per_node']:.1f}",
             f"{r['checkpoint_gb']:.2f} × {r['checkpoints_kept']} = {r['checkpoints_disk_gb']:.1f}",
             f"{r['mds_disk_gb']:.2f}", f"{r['hours']:.2g} ({r['mfu']})"]
    return "| " + " | ".join(cells) + " |"


def markdown_header() -> str:
    return "| " + " | ".join(MARKDOWN_COLUMNS) + " |\n|" + "---|" * len(MARKDOWN_COLUMNS)


def json_line(result: dict) -> str:
    return json.dumps({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                       for k, v in result.items()})
