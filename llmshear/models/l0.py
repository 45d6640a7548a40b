"""Hard-concrete L0 masks towards a named target shape, their expected size, and the Lagrangian that enforces it.

Masks are data: :func:`mask_specs` turns a source :class:`~llmshear.models.llama.LlamaConfig` and a
:class:`TargetShape` into one table of :class:`MaskSpec` rows, and every other function loops over that table.

Top-k runs along the last axis of each structure's gates: ``layer`` and ``hidden`` keep ``target.n_layers`` /
``target.d_model`` overall, ``kv_group`` and ``intermediate`` keep ``target.n_kv_heads`` /
``target.intermediate_size`` in every layer, and ``head`` keeps ``target.q_per_kv`` query heads in every (layer,
KV group): the same number everywhere, which is what makes the cut model a valid Hugging Face GQA model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from llmshear.models.llama import LlamaConfig, Masks

logger = logging.getLogger(__name__)

STRUCTURES = ("layer", "kv_group", "head", "intermediate", "hidden")
TARGET_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "intermediate_size")
FIXED_KEYS = ("head_dim", "vocab_size")  # accepted in a target only when equal to the source's
LIMITS = (-0.1, 1.1)  # stretch of the concrete distribution, so that exact 0 and 1 have nonzero probability
TEMPERATURE = 2 / 3
EPS = 1e-6


@dataclass(frozen=True)
class TargetShape:
    """The architecture a pruning run aims at; ``head_dim`` and ``vocab_size`` stay the source's."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_dict(cls, values: Mapping, source: LlamaConfig, structures: Iterable[str] = STRUCTURES) -> TargetShape:
        """Build and validate a target from config keys; a missing key keeps the source's size.

        A missing ``n_kv_heads`` is the fewest KV heads that can hold ``n_heads`` (for an MHA source: ``n_heads``;
        for a GQA source whose group size divides ``n_heads``: ``n_heads / source.q_per_kv``).

        Raises:
            ValueError: listing every problem, each naming its key (``target.n_heads`` ...).
        """
        problems = [f"target.{k}: unknown key (known: {', '.join(TARGET_KEYS + FIXED_KEYS)})"
                    for k in values if k not in TARGET_KEYS + FIXED_KEYS]
        problems += [f"target.{k}={values[k]} differs from the source's {getattr(source, k)}; it cannot be pruned"
                     for k in FIXED_KEYS if k in values and values[k] != getattr(source, k)]
        sizes = {k: values.get(k, getattr(source, k)) for k in TARGET_KEYS}
        if "n_kv_heads" not in values and isinstance(sizes["n_heads"], int):
            sizes["n_kv_heads"] = _default_kv_heads(sizes["n_heads"], source)
        problems += [f"target.{k}={v!r} must be a positive integer" for k, v in sizes.items()
                     if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        _raise_if(problems)
        target = cls(**sizes)
        _raise_if(target.check(source, structures))
        return target

    def check(self, source: LlamaConfig, structures: Iterable[str] = STRUCTURES) -> list[str]:
        """Every reason this target cannot be cut from ``source`` with ``structures`` (empty when valid)."""
        structures = list(structures)
        problems = [f"structures: unknown {s!r} (known: {', '.join(STRUCTURES)})" for s in structures
                    if s not in STRUCTURES]
        problems += [f"target.{k}={getattr(self, k)} is larger than the source's {getattr(source, k)}"
                     for k in TARGET_KEYS if getattr(self, k) > getattr(source, k)]
        if self.n_heads % self.n_kv_heads:
            problems.append(f"target.n_heads={self.n_heads} is not a multiple of target.n_kv_heads={self.n_kv_heads}")
        elif self.q_per_kv > source.q_per_kv:
            problems.append(
                f"target.n_kv_heads={self.n_kv_heads}: {self.q_per_kv} query heads per KV head cannot be formed "
                f"from the source's groups of {source.q_per_kv} query heads"
            )
        if not problems:
            problems = [f"target.{s.key}={getattr(self, s.key)} needs structure {s.name!r}, which is not in "
                        f"structures {structures}" for s in _all_specs(source, self)
                        if s.keep < s.units and s.name not in structures]
        return problems

    def to_config(self, source: LlamaConfig) -> LlamaConfig:
        """The source's config with this target's sizes."""
        return dataclasses.replace(source, **dataclasses.asdict(self))


def _default_kv_heads(n_heads: int, source: LlamaConfig) -> int:
    """The fewest KV heads (at most the source's) that hold ``n_heads`` in groups no larger than the source's."""
    least = max(1, -(-n_heads // source.q_per_kv))
    return next((k for k in range(least, source.n_kv_heads + 1) if n_heads % k == 0), least)


@dataclass(frozen=True)
class MaskSpec:
    """One structure: gates of ``shape``; each row (last axis) of ``units`` keeps ``keep``, set by ``target.<key>``."""

    name: str
    shape: tuple[int, ...]
    gates: str
    units: int
    keep: int
    key: str

    @property
    def final_sparsity(self) -> float:
        return 1.0 - self.keep / self.units


def mask_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The gate shape of every structure of ``cfg``, in :data:`STRUCTURES` order."""
    return {"layer": (cfg.n_layers,), "kv_group": (cfg.n_layers, cfg.n_kv_heads),
            "head": (cfg.n_layers, cfg.n_kv_heads, cfg.q_per_kv),
            "intermediate": (cfg.n_layers, cfg.intermediate_size), "hidden": (cfg.d_model,)}


def _all_specs(source: LlamaConfig, target: TargetShape) -> list[MaskSpec]:
    """Every structure's spec in :data:`STRUCTURES` order, also those whose target equals the source."""
    table = [  # name, what one unit gates, kept per row, target key
        ("layer", "attention and MLP output of one decoder layer", target.n_layers, "n_layers"),
        ("kv_group", "one KV head and all query heads that share it", target.n_kv_heads, "n_kv_heads"),
        ("head", "one query head inside its KV group", target.q_per_kv, "n_heads"),
        ("intermediate", "one SwiGLU channel", target.intermediate_size, "intermediate_size"),
        ("hidden", "one residual-stream dimension", target.d_model, "d_model"),
    ]
    shapes = mask_shapes(source)
    return [MaskSpec(name, shapes[name], gates, shapes[name][-1], keep, key) for name, gates, keep, key in table]


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ValueError("invalid pruning target:\n  " + "\n  ".join(problems))


def mask_specs(source: LlamaConfig, target: TargetShape, structures: Iterable[str] = STRUCTURES) -> list[MaskSpec]:
    """The table of learned masks; structures whose target equals the source are left out.

    Raises:
        ValueError: the target is invalid for ``source`` and ``structures`` (see :meth:`TargetShape.check`).
    """
    structures = list(structures)
    _raise_if(target.check(source, structures))
    return [s for s in _all_specs(source, target) if s.name in structures and s.keep < s.units]


def sample_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """One hard-concrete sample per gate, same shape as ``log_alpha``, values in ``[0, 1]``.

    The concrete (relaxed Bernoulli) sample is stretched to ``LIMITS`` and clipped back to ``[0, 1]``: the
    stretch gives exact zeros and ones a nonzero probability while keeping a reparameterised gradient.
    """
    u = torch.rand_like(log_alpha).clamp(EPS, 1 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / TEMPERATURE)
    low, high = LIMITS
    return (s * (high - low) + low).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(z != 0)`` per gate (the expected L0 norm), differentiable in ``log_alpha``."""
    low, high = LIMITS
    return torch.sigmoid(log_alpha - TEMPERATURE * math.log(-low / high))


def deterministic_gates(log_alpha: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep exactly the ``keep`` highest-scoring units of every row (last axis); the rest are exactly 0.

    A kept unit's value is its probability of being nonzero, :func:`prob_nonzero`: strictly positive, so it
    is never mistaken for a pruned unit, and close to 1 for the confident gates a finished run has.
    """
    index = log_alpha.topk(keep, dim=-1).indices
    values = prob_nonzero(log_alpha).gather(-1, index)
    return torch.zeros_like(log_alpha).scatter(-1, index, values)


def params_of_masks(cfg: LlamaConfig, masks: Masks) -> torch.Tensor:
    """Parameter count of ``cfg``'s model after keeping the units the gates select; float64 scalar.

    With 0/1 indicators it is the exact count of the cut model; with probabilities ``P(z != 0)`` it is the
    expected count, because the count is multilinear in the gates (no gate is multiplied by itself) and
    different gates are independent, so ``E[D * H_l * z_l] = E[D] * E[H_l] * E[z_l]``. A missing mask means
    "keep everything". Counts every parameter whose size depends on a pruned axis, i.e. all of them.
    """
    device = next((m.device for m in masks.values()), torch.device("cpu"))

    def gate(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return masks[name].double() if name in masks else torch.ones(shape, dtype=torch.float64, device=device)

    n_layers, n_kv = cfg.n_layers, cfg.n_kv_heads
    kv = gate("kv_group", (n_layers, n_kv))
    q_heads = (kv.unsqueeze(-1) * gate("head", (n_layers, n_kv, cfg.q_per_kv))).sum((1, 2))  # (L,)
    kv_heads = kv.sum(1)  # (L,)
    channels = gate("intermediate", (n_layers, cfg.intermediate_size)).sum(1)  # (L,)
    d = gate("hidden", (cfg.d_model,)).sum()
    qkv_rows = cfg.head_dim * (q_heads + 2 * kv_heads)
    # q/k/v weights and o_proj weight scale with d; q/k/v biases do not. Two RMSNorm weights per layer.
    per_d = qkv_rows + cfg.head_dim * q_heads + 3 * channels + 2 + int(cfg.o_bias)
    per_layer = d * per_d + int(cfg.qkv_bias) * qkv_rows
    embeddings = (1 if cfg.tie_word_embeddings else 2) * cfg.vocab_size * d
    return (gate("layer", (n_layers,)) * per_layer).sum() + embeddings + d  # + final norm


class Lagrangian(nn.Module):
    """Multipliers ``λ1, λ2`` (shape ``(1,)`` each, FSDP2 rejects 0-d parameters) per structure.

    The term ``λ1 (ŝ - t) + λ2 (ŝ - t)^2`` is minimised by the gates and *maximised* by the λ's: the
    optimizer gives the ``lagrangian.*`` parameters a negative learning rate (``llmshear/optim.py``). Ascent
    makes λ1 grow in magnitude, with the sign that penalises the gap, for as long as ``ŝ`` misses ``t``, so the
    constraint wins eventually; a fixed penalty would instead trade sparsity against the LM loss.
    """

    def __init__(self, names: Iterable[str]):
        super().__init__()
        names = list(names)
        self.lambda1 = nn.ParameterDict({n: nn.Parameter(torch.zeros(1)) for n in names})
        self.lambda2 = nn.ParameterDict({n: nn.Parameter(torch.zeros(1)) for n in names})

    def forward(self, name: str, gap: torch.Tensor) -> torch.Tensor:
        """``gap = ŝ - t`` (scalar) → the structure's term, shape ``(1,)``."""
        return self.lambda1[name] * gap + self.lambda2[name] * gap * gap


class L0Module(nn.Module):
    """Learned hard-concrete gates for every structure in :func:`mask_specs`, plus their Lagrangian.

    Parameters: ``log_alpha.<structure>`` (the gate logits, optimised with ``lag_lr``) and
    ``lagrangian.lambda1.<structure>`` / ``lagrangian.lambda2.<structure>`` (ascent). Buffer ``step`` holds
    the batch count given to :meth:`set_step`; source, target and options travel as ``_extra_state`` so that
    a checkpoint alone rebuilds the module (see :func:`l0_from_state_dict`).

    Args:
        source: the model being pruned.
        target: the shape to reach.
        structures: the structures that may be learned; a target that needs another one is an error.
        lagrangian_warmup: batches over which the target sparsity ramps linearly from 0 to its final value.
        init_log_alpha: initial gate logit; 5 makes every gate start open (``P(z != 0) ≈ 0.999``).
        log_alpha_limit: logits are clamped to ``±limit`` at every :meth:`set_step`, so that a gate pushed far
            open or shut can still move back within a few steps.
    """

    def __init__(self, source: LlamaConfig, target: TargetShape, structures: Iterable[str] = STRUCTURES, *,
                 lagrangian_warmup: int = 0, init_log_alpha: float = 5.0, log_alpha_limit: float = 10.0):
        super().__init__()
        self.source, self.target, self.structures = source, target, list(structures)
        self.options = {"lagrangian_warmup": int(lagrangian_warmup), "init_log_alpha": float(init_log_alpha),
                        "log_alpha_limit": float(log_alpha_limit)}
        self.specs = mask_specs(source, target, self.structures)
        self.log_alpha = nn.ParameterDict({s.name: nn.Parameter(torch.empty(s.shape)) for s in self.specs})
        self.lagrangian = Lagrangian(s.name for s in self.specs)
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Open gates, zero multipliers, step 0 (also what a meta-device initialisation calls)."""
        with torch.no_grad():
            for p in self.log_alpha.values():
                p.fill_(self.options["init_log_alpha"])
            for p in self.lagrangian.parameters():
                p.zero_()
            self.step.zero_()

    def forward(self) -> Masks:
        """Masks for :meth:`LlamaLM.forward`: hard-concrete samples in training mode, else deterministic."""
        if self.training:
            return {s.name: sample_gates(self.log_alpha[s.name]) for s in self.specs}
        return self.deterministic_masks()

    @torch.no_grad()
    def deterministic_masks(self) -> Masks:
        """Exactly the target count per row (see :func:`deterministic_gates`)."""
        return {s.name: deterministic_gates(self.log_alpha[s.name].detach(), s.keep) for s in self.specs}

    @torch.no_grad()
    def set_step(self, batch: int) -> None:
        """Record the current batch (called at ``batch_start``) and clamp the logits to their limit."""
        self.step.fill_(batch)
        limit = self.options["log_alpha_limit"]
        for p in self.log_alpha.values():
            p.clamp_(-limit, limit)

    def target_sparsity(self) -> dict[str, float]:
        """Per structure, the final sparsity scaled by ``min(1, step / lagrangian_warmup)``."""
        warmup = self.options["lagrangian_warmup"]
        ramp = 1.0 if warmup <= 0 else min(1.0, int(self.step.item()) / warmup)
        return {s.name: s.final_sparsity * ramp for s in self.specs}

    def probabilities(self) -> Masks:
        """``P(z != 0)`` per gate, differentiable."""
        return {s.name: prob_nonzero(self.log_alpha[s.name]) for s in self.specs}

    def expected_sparsity(self) -> dict[str, torch.Tensor]:
        """Per structure, the expected fraction of pruned units (scalar tensors)."""
        return {name: 1.0 - p.mean() for name, p in self.probabilities().items()}

    def expected_params(self) -> torch.Tensor:
        """Expected parameter count of the masked model (float64 scalar, differentiable)."""
        return params_of_masks(self.source, self.probabilities())

    def lagrangian_loss(self) -> torch.Tensor:
        """Sum over structures of ``λ1 (ŝ - t) + λ2 (ŝ - t)^2``, a scalar (zero without structures)."""
        expected, target = self.expected_sparsity(), self.target_sparsity()
        loss = self.step.new_zeros((), dtype=torch.float32)
        for name in expected:
            loss = loss + self.lagrangian(name, expected[name] - target[name]).squeeze(0)
        return loss

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Scalars to log: expected and target sparsity, λ1, λ2 per structure, and expected parameters."""
        out = {"l0/expected_params": float(self.expected_params())}
        target = self.target_sparsity()
        for name, sparsity in self.expected_sparsity().items():
            out[f"l0/{name}/expected_sparsity"] = float(sparsity)
            out[f"l0/{name}/target_sparsity"] = target[name]
            out[f"l0/{name}/lambda1"] = float(self.lagrangian.lambda1[name])
            out[f"l0/{name}/lambda2"] = float(self.lagrangian.lambda2[name])
        return out

    def get_extra_state(self) -> dict:
        return {"source": self.source.to_dict(), "target": dataclasses.asdict(self.target),
                "structures": list(self.structures), "options": dict(self.options)}

    def set_extra_state(self, state: dict) -> None:
        # The learned tensors only make sense for the run's own target: refuse to resume a different one.
        # Options (schedule, limits) may change on resume: the run's config wins.
        mine = self.get_extra_state()
        for key in ("target", "structures"):
            if state[key] != mine[key]:
                raise ValueError(f"checkpoint L0 {key} {state[key]} differs from this run's {mine[key]}")
        if state["options"] != mine["options"]:
            logger.warning("L0 options changed since the checkpoint: %s -> %s", state["options"], mine["options"])


def l0_from_state_dict(state: Mapping[str, object]) -> L0Module:
    """Rebuild an :class:`L0Module` from its own ``state_dict()`` (keys without prefix), weights included."""
    extra = state["_extra_state"]
    source = LlamaConfig(**extra["source"])
    module = L0Module(source, TargetShape(**extra["target"]), extra["structures"], **extra["options"])
    module.load_state_dict(state)
    return module
