"""Hard-concrete L0 masks towards a named target shape, their expected size, and the Lagrangian that enforces it.

Masks are data: :func:`mask_specs` turns a source :class:`~llmshear.models.llama.LlamaConfig` and a
:class:`TargetShape` into one table of :class:`MaskSpec` rows, and every other function loops over that table.

Top-k runs along the last axis of each structure's gates: ``layer`` and ``hidden`` keep ``target.n_layers`` /
``target.d_model`` overall, ``kv_group`` and ``intermediate`` keep ``target.n_kv_heads`` /
``target.intermediate_size`` in every layer, and ``head`` keeps ``target.q_per_kv`` query heads in every (layer,
KV group): the same number everywhere, which is what makes the cut model a valid Hugging Face GQA model.

How the expected size meets its (ramped) target, ``constraint``:

- ``exact`` (default): every row's gates read ``(log α - c) / τ``, with the row's shift ``c`` solved at every step
  (bisection, no gradient) so that the row's expected kept count *equals* its scheduled target. Nothing has to
  catch up with the schedule, so nothing overshoots; the logits learn only which units to keep (the LM loss
  reaches them through the samples). A small logit temperature ``τ`` keeps the band of undecided gates narrow:
  units leave one by one, from the lowest-ranked up, instead of the whole row turning noisy at once.
- ``row``: per-row Lagrange multipliers, trained by gradient ascent, pull every row's expected count to the count
  the cut keeps there.
- ``paper``: the paper's form (Sheared-LLaMA and its code): one pair of multipliers per structure, applied to
  every row's gap and averaged over the rows.
- ``overall``: one pair of multipliers per structure on its mean sparsity (the form of the first release). The
  cut keeps exactly ``keep`` units in every row, so this form can be met by uneven rows, whose extra or missing
  units the cut then adds or removes without the network ever having trained that way.

Three kinds of masks come out of :class:`L0Module`: hard-concrete *samples* (training), the *current* model
(the noise-free gate of Louizos et al., what evaluation during pruning measures by default) and the
*deterministic* target-shape masks (exactly ``keep`` per row; what the cut uses). From ``harden_batch`` on,
the deterministic masks are frozen as 0/1 and used for training and evaluation alike, so the weights adapt to
exactly the sub-network the cut keeps, and the masked model at the end of pruning *is* the cut model.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from llmshear.choices import CONSTRAINTS, EVAL_MASKS, HARDEN_BY, STRUCTURES
from llmshear.models.llama import LlamaConfig, Masks

logger = logging.getLogger(__name__)

TARGET_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "intermediate_size")
FIXED_KEYS = ("head_dim", "vocab_size")  # accepted in a target only when equal to the source's
LIMITS = (-0.1, 1.1)  # stretch of the concrete distribution, so that exact 0 and 1 have nonzero probability
TEMPERATURE = 2 / 3
EPS = 1e-6
DECIDED = 0.95  # a gate with P(z != 0) >= DECIDED is decided open, <= 1 - DECIDED decided shut


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


def expected_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """The noise-free gate ``clamp(sigmoid(log α) (high - low) + low, 0, 1)``: the model training samples around.

    Louizos et al.'s test-time estimator: exactly 0 for logits below about -2.4, exactly 1 above +2.4.
    """
    low, high = LIMITS
    return (torch.sigmoid(log_alpha) * (high - low) + low).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor, keep: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Keep exactly the ``keep`` highest-scoring units of every row (last axis); the rest are exactly 0.

    The score is the logit itself, or ``scores`` (same shape) when given, ties then going to the higher logit.
    Whatever the logits: remaining ties go to the lower index (stable sorts), and a NaN ranks below every number.
    A kept unit's value is its probability of being nonzero, :func:`prob_nonzero`, floored at :data:`EPS`:
    strictly positive, so it is never mistaken for a pruned unit even when the gate underflowed (a far
    negative logit after a large ``lag_lr`` step) or is NaN, and close to 1 for the confident gates a finished
    run has.
    """
    def ranked(values: torch.Tensor) -> torch.Tensor:
        return values.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)

    index = ranked(log_alpha).sort(dim=-1, descending=True, stable=True).indices
    if scores is not None:
        index = index.gather(-1, ranked(scores).gather(-1, index).sort(dim=-1, descending=True, stable=True).indices)
    index = index[..., :keep]
    values = prob_nonzero(log_alpha).gather(-1, index).nan_to_num(nan=EPS).clamp_min(EPS)
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
    """Multipliers ``λ1, λ2`` per structure, one pair per constrained row (shape ``(1,)`` at least: FSDP2
    rejects 0-d parameters).

    The term ``Σ_rows λ1 (ŝ - t) + λ2 (ŝ - t)^2`` is minimised by the gates and *maximised* by the λ's: the
    optimizer gives the ``lagrangian.*`` parameters a negative learning rate (``llmshear/optim.py``). Ascent
    makes λ1 grow in magnitude, with the sign that penalises the gap, for as long as ``ŝ`` misses ``t``, so the
    constraint wins eventually; a fixed penalty would instead trade sparsity against the LM loss.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        super().__init__()
        self.lambda1 = nn.ParameterDict({n: nn.Parameter(torch.zeros(shape)) for n, shape in shapes.items()})
        self.lambda2 = nn.ParameterDict({n: nn.Parameter(torch.zeros(shape)) for n, shape in shapes.items()})

    def forward(self, name: str, gap: torch.Tensor) -> torch.Tensor:
        """``gap = ŝ - t`` per row (the multipliers' shape) → the structure's term, a scalar."""
        return (self.lambda1[name] * gap + self.lambda2[name] * gap * gap).sum()


class L0Module(nn.Module):
    """Learned hard-concrete gates for every structure in :func:`mask_specs`, plus their Lagrangian.

    Parameters: ``log_alpha.<structure>`` (the gate logits, optimised with ``lag_lr``) and
    ``lagrangian.lambda1.<structure>`` / ``lagrangian.lambda2.<structure>`` (ascent). Buffers: ``step`` (the
    batch count given to :meth:`set_step`), ``hardened`` and ``hard_<structure>`` (the frozen 0/1 masks),
    ``shift_<structure>`` (``exact``: the row shifts of :meth:`update_shifts`), ``usage_<structure>`` and
    ``usage_batches`` (what :meth:`record_usage` summed).
    Source, target and options travel as ``_extra_state``, so a checkpoint alone rebuilds the module (see
    :func:`l0_from_state_dict`).

    Args:
        source: the model being pruned.
        target: the shape to reach.
        structures: the structures that may be learned; a target that needs another one is an error.
        lagrangian_warmup: batches over which the target sparsity ramps linearly from 0 to its final value.
        harden_batch: from this batch on the deterministic masks are frozen as 0/1 and used in training too;
            ``None`` never (the cut then folds ``P(z != 0)`` of the kept units into the weights, as the paper).
        harden_by: what ranks the units when the masks freeze: ``usage`` (the mean ``P(z != 0)`` over the
            batches since the ramp reached the target, i.e. the units the weights trained with at the target
            size; the logits break ties) or ``logits`` (their last values).
        constraint: ``exact``, ``row`` or ``overall`` (see the module docstring).
        temperature, final_temperature: ``exact`` only: the logit temperature ``τ`` until the end of the
            warm-up, then linearly down to ``final_temperature`` at ``harden_batch`` (or the warm-up's end).
        layer_final_temperature: ``exact`` only: the layer row's ``final_temperature`` (``None``: the same as
            the others'). Lower, the few layer gates near the row's threshold decide before the masks freeze.
        eval_masks: what evaluation measures before hardening: ``current`` (:func:`expected_gates`) or
            ``target`` (the deterministic target-shape masks).
        init_log_alpha: initial gate logit; 4.6 makes every gate start open (``P(z != 0) ≈ 0.998``).
        log_alpha_limit: logits are clamped to ``±limit`` at every :meth:`set_step`, so that a gate pushed far
            open or shut can still move back within a few steps.
        init_noise: standard deviation of the normal noise added to the initial logits, so ties between units
            are broken by chance rather than by index.
    """

    def __init__(self, source: LlamaConfig, target: TargetShape, structures: Iterable[str] = STRUCTURES, *,
                 lagrangian_warmup: int = 0, harden_batch: int | None = None, harden_by: str = "usage",
                 constraint: str = "exact", eval_masks: str = "current", init_log_alpha: float = 4.6,
                 log_alpha_limit: float = 10.0, init_noise: float = 0.01, temperature: float = 0.1,
                 final_temperature: float = 0.05, layer_final_temperature: float | None = None):
        super().__init__()
        if constraint not in CONSTRAINTS or eval_masks not in EVAL_MASKS or harden_by not in HARDEN_BY:
            raise ValueError(f"constraint {constraint!r} / eval_masks {eval_masks!r} / harden_by {harden_by!r}: "
                             f"expected one of {CONSTRAINTS} / {EVAL_MASKS} / {HARDEN_BY}")
        layer_final_temperature = final_temperature if layer_final_temperature is None else layer_final_temperature
        if not (0 < final_temperature <= temperature and 0 < layer_final_temperature <= temperature):
            raise ValueError(f"temperatures must satisfy 0 < final_temperature, layer_final_temperature <= "
                             f"temperature, got {temperature}, {final_temperature}, {layer_final_temperature}")
        self.source, self.target, self.structures = source, target, list(structures)
        self.options = {"lagrangian_warmup": int(lagrangian_warmup), "harden_batch": harden_batch,
                        "harden_by": harden_by, "constraint": constraint, "eval_masks": eval_masks,
                        "init_log_alpha": float(init_log_alpha),
                        "log_alpha_limit": float(log_alpha_limit), "init_noise": float(init_noise),
                        "temperature": float(temperature), "final_temperature": float(final_temperature),
                        "layer_final_temperature": float(layer_final_temperature)}
        self.specs = mask_specs(source, target, self.structures)
        self.log_alpha = nn.ParameterDict({s.name: nn.Parameter(torch.empty(s.shape)) for s in self.specs})
        rows = {s.name: (s.shape[:-1] or (1,)) if constraint == "row" else (1,) for s in self.specs}
        self.lagrangian = Lagrangian({} if constraint == "exact" else rows)
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        self.register_buffer("hardened", torch.zeros(1, dtype=torch.bool))
        self.register_buffer("usage_batches", torch.zeros(1, dtype=torch.long))
        for spec in self.specs:
            self.register_buffer(f"hard_{spec.name}", torch.zeros(spec.shape))
            self.register_buffer(f"shift_{spec.name}", torch.zeros(spec.shape[:-1] + (1,)))
            self.register_buffer(f"usage_{spec.name}", torch.zeros(spec.shape, dtype=torch.float64))
        self.register_load_state_dict_pre_hook(_without_usage)
        self.eval_kind = eval_masks
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Open gates, zero multipliers, step 0, not hardened (also what a meta-device initialisation calls)."""
        with torch.no_grad():
            for p in self.log_alpha.values():
                p.normal_(self.options["init_log_alpha"], self.options["init_noise"])
            for p in self.lagrangian.parameters():
                p.zero_()
            self.step.zero_()
            self.hardened.zero_()
            self.usage_batches.zero_()
            for spec in self.specs:
                getattr(self, f"hard_{spec.name}").zero_()
                getattr(self, f"shift_{spec.name}").zero_()
                getattr(self, f"usage_{spec.name}").zero_()

    def is_hardened(self) -> bool:
        return bool(self.hardened.item())

    def gate_logits(self, name: str) -> torch.Tensor:
        """The logits the gates of ``name`` read: ``(log α - c) / τ`` for ``exact``, else ``log α``."""
        if self.options["constraint"] != "exact":
            return self.log_alpha[name]
        return (self.log_alpha[name] - getattr(self, f"shift_{name}")) / self.temperature(name)

    def temperature(self, name: str = "") -> float:
        """``exact``: the current logit temperature of structure ``name`` (constant, then linear down to the final
        one: ``layer_final_temperature`` for ``layer``, ``final_temperature`` for the others)."""
        o = self.options
        start = o["lagrangian_warmup"]
        end = o["harden_batch"] if o["harden_batch"] is not None else start
        progress = 1.0 if end <= start else min(1.0, max(0.0, (int(self.step.item()) - start) / (end - start)))
        final = o["layer_final_temperature"] if name == "layer" else o["final_temperature"]
        return o["temperature"] + (final - o["temperature"]) * progress

    @torch.no_grad()
    def update_shifts(self, iterations: int = 50) -> None:
        """``exact``: solve every row's shift so that its expected kept count equals the scheduled target.

        The expected count ``Σ P(z != 0)`` falls monotonically as the shift grows, so bisection finds it; the
        interval starts wide enough to hold every answer (a target of all units drives the shift to its floor).
        """
        if self.options["constraint"] != "exact":
            return
        ramp = self.ramp()
        for spec in self.specs:
            tau = self.temperature(spec.name)
            logits = self.log_alpha[spec.name].detach().float()
            wanted = spec.units - (spec.units - spec.keep) * ramp
            low = logits.amin(-1, keepdim=True) - 20 * tau - 20
            high = logits.amax(-1, keepdim=True) + 20 * tau + 20
            for _ in range(iterations):
                middle = (low + high) / 2
                too_many = prob_nonzero((logits - middle) / tau).sum(-1, keepdim=True) > wanted
                low, high = torch.where(too_many, middle, low), torch.where(too_many, high, middle)
            getattr(self, f"shift_{spec.name}").copy_((low + high) / 2)

    def forward(self) -> Masks:
        """Masks for :meth:`LlamaLM.forward`: the frozen 0/1 masks once hardened; before that, hard-concrete
        samples in training mode, else the masks of :meth:`use_eval_masks` (default: the run's ``eval_masks``)."""
        if self.is_hardened():
            return self.hard_masks()
        if self.training:
            return {s.name: sample_gates(self.gate_logits(s.name)) for s in self.specs}
        if self.eval_kind == "current":
            return {s.name: expected_gates(self.gate_logits(s.name)) for s in self.specs}
        return self.deterministic_masks()

    def use_eval_masks(self, kind: str | None) -> None:
        """Evaluate the ``current`` model or the ``target`` cut from now on; ``None``: the run's ``eval_masks``."""
        kind = kind or self.options["eval_masks"]
        if kind not in EVAL_MASKS:
            raise ValueError(f"eval masks {kind!r}: expected one of {EVAL_MASKS}")
        self.eval_kind = kind

    def hard_masks(self) -> Masks:
        return {s.name: getattr(self, f"hard_{s.name}") for s in self.specs}

    @torch.no_grad()
    def deterministic_masks(self) -> Masks:
        """Exactly the target count per row: the frozen 0/1 masks once hardened, else :func:`deterministic_gates`."""
        if self.is_hardened():
            return {name: mask.clone() for name, mask in self.hard_masks().items()}
        return {s.name: deterministic_gates(self.gate_logits(s.name).detach(), s.keep) for s in self.specs}

    @torch.no_grad()
    def set_step(self, batch: int) -> None:
        """Record the current batch (called at ``batch_start``) and clamp the logits to their limit."""
        self.step.fill_(batch)
        limit = self.options["log_alpha_limit"]
        for p in self.log_alpha.values():
            p.clamp_(-limit, limit)

    def harden_due(self) -> bool:
        """Whether the masks should be frozen now (``harden_batch`` reached and not frozen yet)."""
        at = self.options["harden_batch"]
        return at is not None and int(self.step.item()) >= at and not self.is_hardened()

    @torch.no_grad()
    def record_usage(self) -> None:
        """Add every gate's ``P(z != 0)`` to its usage, once per batch from the batch the ramp reaches the target
        until the masks freeze (called at ``batch_start``, after :meth:`update_shifts`)."""
        if self.is_hardened() or self.ramp() < 1:
            return
        for spec in self.specs:
            getattr(self, f"usage_{spec.name}").add_(prob_nonzero(self.gate_logits(spec.name).detach()).double())
        self.usage_batches.add_(1)

    def harden_scores(self, name: str) -> torch.Tensor | None:
        """What ranks the units of ``name`` when the masks freeze: their usage, or ``None`` for the logits (as
        ``harden_by`` says; the logits too when no usage was recorded: a hardening before the ramp's end)."""
        by_usage = self.options["harden_by"] == "usage" and int(self.usage_batches.item()) > 0
        return getattr(self, f"usage_{name}") if by_usage else None

    @torch.no_grad()
    def harden(self) -> None:
        """Freeze exactly ``keep`` units per row as 0/1 masks, ranked as :meth:`harden_scores` says; training goes
        on with them."""
        for spec in self.specs:
            mask = deterministic_gates(self.gate_logits(spec.name).detach(), spec.keep, self.harden_scores(spec.name))
            getattr(self, f"hard_{spec.name}").copy_((mask != 0).float())
        self.hardened.fill_(True)
        logger.info("batch %d: masks hardened to 0/1 (%s)", int(self.step.item()),
                    ", ".join(f"{k}: {v['undecided']:.1%} undecided" for k, v in self.cut_report().items()))

    @torch.no_grad()
    def layer_candidates(self, limit: int) -> list[torch.Tensor]:
        """Once hardened: the 0/1 layer masks a comparison may choose among, the frozen one first.

        The layers whose gate is decided open (``P(z != 0) >= DECIDED``) stay and those decided shut stay out;
        the places left go to the undecided gates in every way, the ways the hardening's ranking prefers first,
        ``limit`` masks at most. One mask (nothing undecided, or decided gates that alone fill or overfill the
        target) leaves nothing to compare.
        """
        spec = next((s for s in self.specs if s.name == "layer"), None)
        if spec is None or not self.is_hardened():
            return []
        frozen = self.hard_layer.clone()
        p = prob_nonzero(self.gate_logits("layer").detach())
        scores = self.harden_scores("layer")
        rank = (scores if scores is not None else p).double()
        undecided = [int(i) for i in rank.argsort(descending=True, stable=True) if 1 - DECIDED < p[i] < DECIDED]
        decided_open = (p >= DECIDED).float()
        places = spec.keep - int(decided_open.sum())
        candidates = [frozen]
        if not 0 < places < len(undecided):
            return candidates
        for chosen in itertools.combinations(undecided, places):
            mask = decided_open.clone()
            mask[list(chosen)] = 1.0
            if not torch.equal(mask, frozen):
                candidates.append(mask)
            if len(candidates) == limit:
                break
        return candidates

    @torch.no_grad()
    def freeze_layers(self, mask: torch.Tensor) -> None:
        """Replace the frozen layer mask by ``mask`` (one of :meth:`layer_candidates`)."""
        self.hard_layer.copy_(mask)

    def ramp(self) -> float:
        """Fraction of the final sparsity the target asks for now: ``min(1, step / lagrangian_warmup)``."""
        warmup = self.options["lagrangian_warmup"]
        return 1.0 if warmup <= 0 else min(1.0, int(self.step.item()) / warmup)

    def target_sparsity(self) -> dict[str, float]:
        """Per structure, the final sparsity scaled by :meth:`ramp`."""
        return {s.name: s.final_sparsity * self.ramp() for s in self.specs}

    def probabilities(self) -> Masks:
        """``P(z != 0)`` per gate, differentiable."""
        return {s.name: prob_nonzero(self.gate_logits(s.name)) for s in self.specs}

    def expected_sparsity(self) -> dict[str, torch.Tensor]:
        """Per structure, the expected fraction of pruned units (scalar tensors)."""
        return {name: 1.0 - p.mean() for name, p in self.probabilities().items()}

    def sparsity_gaps(self) -> dict[str, torch.Tensor]:
        """Per structure, expected minus target sparsity of every row, or of the whole for ``overall``.

        Shapes match the multipliers: the structure's gate shape without its last axis (``(1,)`` for layer
        and hidden), or ``(1,)`` for ``overall``.
        """
        target, gaps = self.target_sparsity(), {}
        overall = self.options["constraint"] == "overall"
        for name, p in self.probabilities().items():
            sparsity = 1.0 - (p.mean() if overall else p.mean(-1))
            shape = p.shape[:-1] if not overall and p.dim() > 1 else (1,)
            gaps[name] = sparsity.reshape(shape) - target[name]
        return gaps

    def expected_params(self) -> torch.Tensor:
        """Expected parameter count of the masked model (float64 scalar, differentiable)."""
        return params_of_masks(self.source, self.probabilities())

    def lagrangian_loss(self) -> torch.Tensor:
        """Sum over structures and rows of ``λ1 (ŝ - t) + λ2 (ŝ - t)^2``, a scalar (zero without structures);
        ``paper``: each structure's term is the mean over its rows (one pair of multipliers per structure)."""
        loss = self.step.new_zeros((), dtype=torch.float32)
        if self.options["constraint"] == "exact":
            # No multipliers: the shifts meet the target. The zero term keeps every gate logit in the graph, so
            # DDP, which waits for a gradient of every parameter, does not stall once the masks are hardened.
            return loss + 0.0 * sum(p.sum() for p in self.log_alpha.values())
        per_row_mean = self.options["constraint"] == "paper"
        for name, gap in self.sparsity_gaps().items():
            loss = loss + self.lagrangian(name, gap) / (gap.numel() if per_row_mean else 1)
        return loss

    @torch.no_grad()
    def cut_report(self) -> dict[str, dict]:
        """Per structure, how well the gates agree with the cut: plain numbers, for logs and benchmarks.

        ``expected_keep``: mean expected kept units per row; ``target_keep``: what the cut keeps per row;
        ``size_error``: relative difference of the expected and the target size of the whole structure;
        ``decided``: fraction of the kept units whose gate has ``P(z != 0) >= 0.95``; ``undecided``: fraction of
        all gates with ``0.05 < P(z != 0) < 0.95``.
        """
        report, masks = {}, self.deterministic_masks()
        for spec in self.specs:
            p = prob_nonzero(self.gate_logits(spec.name).detach()).double()
            kept = masks[spec.name] != 0
            expected = p.sum(-1).mean().item()
            report[spec.name] = {"expected_keep": expected, "target_keep": spec.keep,
                                 "size_error": abs(expected - spec.keep) / spec.keep,
                                 "decided": (p[kept] >= DECIDED).double().mean().item(),
                                 "undecided": ((p > 1 - DECIDED) & (p < DECIDED)).double().mean().item()}
        return report

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Scalars to log per structure: expected and target sparsity, the largest row gap, mean λ1 and λ2, the
        fraction of undecided gates; and the expected parameters and whether the masks are hardened."""
        out = {"l0/expected_params": float(self.expected_params()), "l0/hardened": float(self.is_hardened())}
        target, gaps, report = self.target_sparsity(), self.sparsity_gaps(), self.cut_report()
        for name, sparsity in self.expected_sparsity().items():
            out[f"l0/{name}/expected_sparsity"] = float(sparsity)
            out[f"l0/{name}/target_sparsity"] = target[name]
            out[f"l0/{name}/max_row_gap"] = float(gaps[name].abs().max())
            if name in self.lagrangian.lambda1:
                out[f"l0/{name}/lambda1"] = float(self.lagrangian.lambda1[name].mean())
                out[f"l0/{name}/lambda2"] = float(self.lagrangian.lambda2[name].mean())
            out[f"l0/{name}/undecided"] = report[name]["undecided"]
        return out

    def get_extra_state(self) -> dict:
        return {"source": self.source.to_dict(), "target": dataclasses.asdict(self.target),
                "structures": list(self.structures), "options": dict(self.options)}

    def set_extra_state(self, state: dict) -> None:
        # The learned tensors only make sense for the run's own target and constraint form: refuse to resume a
        # different one. Other options (schedule, limits) may change on resume: the run's config wins.
        mine = self.get_extra_state()
        for key in ("target", "structures"):
            if state[key] != mine[key]:
                raise ValueError(f"checkpoint L0 {key} {state[key]} differs from this run's {mine[key]}")
        if state["options"].get("constraint") != mine["options"]["constraint"]:
            raise ValueError(f"checkpoint L0 constraint {state['options'].get('constraint')!r} differs from this "
                             f"run's {mine['options']['constraint']!r}")
        if state["options"] != mine["options"]:
            logger.warning("L0 options changed since the checkpoint: %s -> %s", state["options"], mine["options"])


def _without_usage(module: L0Module, state: dict, prefix: str, *args) -> None:
    """A checkpoint written before usage was recorded: start its usage empty (hardening then ranks by logits)."""
    if f"{prefix}usage_batches" in state:
        return
    for name, buffer in module.named_buffers(recurse=False):
        if name.startswith("usage_"):
            state[prefix + name] = torch.zeros_like(buffer)


def l0_from_state_dict(state: Mapping[str, object]) -> L0Module:
    """Rebuild an :class:`L0Module` from its own ``state_dict()`` (keys without prefix), weights included."""
    extra = state["_extra_state"]
    source = LlamaConfig(**extra["source"])
    module = L0Module(source, TargetShape(**extra["target"]), extra["structures"], **extra["options"])
    module.load_state_dict(state)
    return module
