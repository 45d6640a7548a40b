"""FSDP2 gradients averaged over the ranks on backends whose reduce-scatter sums where it was asked to average."""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.distributed as torch_dist
from composer.core import Callback, State
from composer.loggers import Logger
from torch.distributed.fsdp import FSDPModule

log = logging.getLogger(__name__)


def reduce_scatter_averages() -> bool:
    """Whether the default process group's ``reduce_scatter_tensor`` with ``ReduceOp.AVG`` averages (NCCL) or
    sums (gloo in torch 2.7 ignores the op). A collective: every rank calls it."""
    world = torch_dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else "cpu"
    out = torch.zeros(1, device=device)
    torch_dist.reduce_scatter_tensor(out, torch.ones(world, device=device), op=torch_dist.ReduceOp.AVG)
    return bool(torch.isclose(out, torch.ones_like(out)).item())


def _divide(world: int, reduced: torch.Tensor) -> None:
    reduced.div_(world)


class FSDPGradientMean(Callback):
    """Make FSDP2's reduced gradients the ranks' mean, as DDP's are, on every backend.

    FSDP2 reduce-scatters every gradient with ``ReduceOp.AVG``; gloo's reduce-scatter ignores the op and sums, so a
    CPU run's gradients, ``train/grad_norm`` and the clipping threshold's effect were world-size times a GPU run's.
    At ``fit_start`` (the model is wrapped by then) the callback asks the process group once whether it averages;
    where it sums, every FSDP2 module gets a hook that divides its reduce-scatter output by the world size (the
    hook FSDP2 runs right after the reduce-scatter, before the gradients reach the parameters). Nothing changes where
    the backend averages or with one process.
    """

    def fit_start(self, state: State, logger: Logger) -> None:
        if not torch_dist.is_initialized() or torch_dist.get_world_size() < 2 or reduce_scatter_averages():
            return
        world = torch_dist.get_world_size()
        modules = [m for m in state.model.modules() if isinstance(m, FSDPModule)]
        for module in modules:
            module.set_all_reduce_hook(partial(_divide, world))
        log.info("FSDP2 on %s: its reduce-scatter sums; %d module(s) divide their reduced gradients by the world "
                 "size %d, so they are the ranks' mean as on NCCL", torch_dist.get_backend(), len(modules), world)
