"""Clip the global gradient norm before every optimizer step, under DDP and FSDP2 alike."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from torch.distributed.tensor import DTensor


def global_grad_norm(grads: Iterable[torch.Tensor]) -> float:
    """L2 norm of all ``grads`` together: sharded (DTensor) gradients over every rank's shard, plain ones as they are.

    torch's ``clip_grad_norm_`` refuses a list that mixes DTensors and plain tensors, which is what an FSDP2 run
    has when some parameters are left unsharded; the two kinds are normed apart and combined here.
    """
    grads = list(grads)
    squares = 0.0
    for group in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
        if group:
            norm = torch.nn.utils.get_total_norm(group)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            squares += float(norm) ** 2
    return math.sqrt(squares)


class ClipGradNorm(Callback):
    """Scale every gradient so that their global L2 norm is at most ``max_norm`` (``optimizer.clip_norm``, or
    ``algorithms.gradient_clipping`` with ``clipping_type: norm``).

    Runs at ``after_train_batch``: after the backward passes of all micro-batches, before the optimizer step
    (where Composer's own ``GradientClipping`` runs; that algorithm fails under FSDP2 on mixed DTensor and plain
    gradients). Logs the norm before clipping as ``train/grad_norm``.
    """

    def __init__(self, max_norm: float):
        if not max_norm > 0:
            raise ValueError(f"the gradient clipping threshold (optimizer.clip_norm or algorithms.gradient_clipping) "
                             f"must be positive to clip, got {max_norm}")
        self.max_norm = max_norm

    def after_train_batch(self, state: State, logger: Logger) -> None:
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        norm = global_grad_norm(grads)
        if norm > self.max_norm:
            scale = self.max_norm / (norm + 1e-6)
            for grad in grads:
                grad.mul_(scale)
        logger.log_metrics({"train/grad_norm": norm})
