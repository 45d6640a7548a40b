"""Optimizer and learning-rate schedule of a pruning or continued-pre-training run.

Pruning solves a saddle-point problem. With model weights ``θ``, gate logits ``α`` and Lagrange multipliers
``λ``, the loss is

    L(θ, α, λ) = CE(θ, z(α)) + Σ_s λ1_s (ŝ_s(α) - t_s) + λ2_s (ŝ_s(α) - t_s)²

where ``ŝ_s`` is the expected sparsity of structure ``s`` and ``t_s`` its target. Training looks for
``min_{θ, α} max_λ L``: the weights and gates descend the loss, the multipliers *ascend* it. Ascent on ``λ``
is what turns the sparsity target into a constraint: while ``ŝ_s`` misses ``t_s``, the gradient
``∂L/∂λ1_s = ŝ_s - t_s`` keeps growing ``|λ1_s|`` (with the sign that penalises the gap), so the penalty
eventually outweighs any gain in cross-entropy. A fixed penalty would instead settle on a trade-off.

Adam with a *negative* learning rate performs exactly that ascent, so the three parameter groups are

============================  ===================  =============
group                         learning rate        weight decay
============================  ===================  =============
model weights                 ``optimizer.lr``     ``optimizer.weight_decay``
gate logits (``log_alpha``)   ``optimizer.lag_lr``  0
multipliers (``lagrangian``)  ``-optimizer.lag_lr``  0
============================  ===================  =============

The schedule (:func:`build_scheduler`) multiplies a group's initial learning rate by a non-negative factor,
so the sign of the multipliers' rate survives warm-up and decay. The weights warm up and decay; the gates and
multipliers keep a constant rate by default (``optimizer.gate_schedule: constant``): in a short run the decay
would halve their rate just when the gates should settle on the target. Weight decay would pull gates towards
"half open" and multipliers towards zero, so both extra groups get none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from composer.optim import DecoupledAdamW
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from llmshear.choices import GATE_SCHEDULES

GATE_PREFIX = "l0.log_alpha."
LAMBDA_PREFIX = "l0.lagrangian."


def parameter_groups(model: nn.Module, lr: float, lag_lr: float, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of a :class:`~llmshear.models.composer_llama.ComposerLlama` in three groups.

    Args:
        model: the Composer model; its L0 module (if any) is the child ``l0``.
        lr: learning rate of the model weights.
        lag_lr: learning rate of the gate logits; the multipliers get ``-lag_lr`` (gradient ascent).
        weight_decay: decoupled weight decay of the model weights (the other groups get 0).

    Returns:
        Parameter groups for a torch optimizer; a group with no parameters is left out. Each group has a
        ``name`` (``weights``, ``gates``, ``lagrangian``) for logging.

    Raises:
        ValueError: a trainable parameter of ``l0`` is neither a gate logit nor a multiplier.
    """
    weights, gates, multipliers = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(GATE_PREFIX):
            gates.append(param)
        elif name.startswith(LAMBDA_PREFIX):
            multipliers.append(param)
        elif name.startswith("l0."):
            raise ValueError(f"parameter {name} of the L0 module is neither a gate logit nor a Lagrange multiplier")
        else:
            weights.append(param)
    groups = [
        {"name": "weights", "params": weights, "lr": lr, "weight_decay": weight_decay},
        {"name": "gates", "params": gates, "lr": lag_lr, "weight_decay": 0.0},
        {"name": "lagrangian", "params": multipliers, "lr": -lag_lr, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, lr: float, lag_lr: float, betas: Sequence[float] = (0.9, 0.95),
                    eps: float = 1e-8, weight_decay: float = 0.0) -> DecoupledAdamW:
    """Composer's :class:`DecoupledAdamW` over :func:`parameter_groups`.

    The optimizer's default ``lr`` is ``lr`` (DecoupledAdamW refuses a negative default); every group sets
    its own rate anyway.
    """
    groups = parameter_groups(model, lr, lag_lr, weight_decay)
    return DecoupledAdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def warmup_cosine(warmup_batches: int, max_batches: int, alpha_f: float) -> Callable[[int], float]:
    """Factor at batch ``t``: linear warm-up ``t / warmup`` to 1, then cosine decay to ``alpha_f`` at ``max_batches``.

    The same curve as Composer's ``CosineAnnealingWithWarmupScheduler``.
    """
    def factor(t: int) -> float:
        if t < warmup_batches:
            return t / warmup_batches
        span = max(1, max_batches - warmup_batches)
        progress = min(1.0, (t - warmup_batches) / span)
        return alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_scheduler(optimizer: Optimizer, warmup_batches: int, alpha_f: float, max_batches: int,
                    gate_schedule: str = "constant") -> LambdaLR:
    """Per-group schedule, stepped once per batch: :func:`warmup_cosine` for the weights; for the gates and
    multipliers the same curve (``gate_schedule="shared"``, as the paper's recipe) or a constant rate.

    Raises:
        ValueError: unknown ``gate_schedule``.
    """
    if gate_schedule not in GATE_SCHEDULES:
        raise ValueError(f"optimizer.gate_schedule {gate_schedule!r}: expected one of {GATE_SCHEDULES}")
    curve = warmup_cosine(warmup_batches, max_batches, alpha_f)
    factors = [curve if group.get("name", "weights") == "weights" or gate_schedule == "shared" else _constant
               for group in optimizer.param_groups]
    return LambdaLR(optimizer, factors)


def _constant(t: int) -> float:
    return 1.0
