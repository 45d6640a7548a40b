"""Long work on every rank (a download, an upload) that the other ranks wait for without a collective timeout.

A rank that waits for another in a barrier or a broadcast fails after the process group's timeout (Composer's
default is 300 s), and a transfer of a 7B checkpoint takes longer. :func:`together` runs the work in a thread and
polls the ranks with a one-element all-reduce every second: no collective ever waits for more than a poll.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from composer.utils import dist

log = logging.getLogger(__name__)

POLL_S = 1.0


def _flag(value: bool) -> torch.Tensor:
    """A one-element tensor on the device the process group's backend reduces on."""
    nccl = torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return torch.tensor([float(value)], device=device)


def together(work: Callable[[], object], what: str) -> list[str]:
    """Run ``work`` on this rank and return once it has ended on every rank (call it on every rank).

    Returns:
        The problems of every rank, the same list on each: ``"rank R: <error>"`` for each rank whose ``work``
        raised an exception; empty when every rank's work succeeded.
    """
    if dist.get_world_size() == 1:
        try:
            work()
        except Exception as err:  # reported to the caller with the other ranks' problems
            return [f"rank 0: {err}"]
        return []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmshear-together") as pool:
        job = pool.submit(work)
        polls = 0
        while True:
            wait([job], timeout=POLL_S)
            flag = _flag(job.done())
            dist.all_reduce(flag, reduce_operation="MIN")
            if flag.item():
                break
            polls += 1
            if polls % 60 == 0:
                log.info("%s: waiting for the other ranks (%d s)", what, int(polls * POLL_S))
    error = job.exception()
    problems = dist.all_gather_object(None if error is None else f"rank {dist.get_global_rank()}: {error}")
    return [problem for problem in problems if problem is not None]
