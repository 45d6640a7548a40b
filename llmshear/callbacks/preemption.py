"""Stop on SIGTERM or SIGUSR1 with a checkpoint at the batch reached, so that a preempted run loses no work.

SLURM ends a job that is preempted, or that nears its time limit with ``#SBATCH --signal=USR1@<seconds>``, by
signalling every process of its steps. :class:`PreemptionStop` notes the signal and lets the current batch finish;
at the batch's end the ranks agree (one all-reduce of a flag per batch: a signal on any rank stops them all at the
same batch), Composer's checkpoint saver writes a checkpoint at that batch on every rank (:func:`save_schedule`),
the remote mirror follows it, and the run ends with :class:`Preempted`, which ``train.py`` turns into exit status
:data:`~llmshear.slurm.PREEMPTED_STATUS` (75). The same command with ``checkpoint.autoresume=true`` resumes from
that checkpoint exactly as from a periodic one. A signal during the last batch lets the run complete normally.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist

from llmshear.slurm import STOP_SIGNALS

log = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint at ``batch``."""

    def __init__(self, batch: int, signum: int):
        super().__init__(f"stopped on {signal.Signals(signum).name} with a checkpoint at batch {batch}; the same "
                         "command with checkpoint.autoresume=true resumes from it")
        self.batch = batch


class PreemptionStop(Callback):
    """Note SIGTERM / SIGUSR1 from ``fit_start`` on; stop every rank at the same batch with a checkpoint there.

    Add it to the Trainer's callbacks *after* Composer's checkpoint saver (and the remote mirror): its
    ``batch_checkpoint`` raises :class:`Preempted` once the checkpoint of that batch is written, and from then on
    the stop signals are ignored until the process ends: Python puts its own handlers back to the default as it
    shuts down, so a late SIGTERM (the ``composer`` launcher's to every rank still alive once one rank has exited
    with 75) would otherwise kill a rank during its exit and turn the job's status 75 into -15. A run that is not
    stopped gets the previous handlers back at ``fit_end``.

    Args:
        max_batches: the run's length; a signal during the last batch lets the run complete.
    """

    def __init__(self, max_batches: int):
        self.max_batches = max_batches
        self.received: int | None = None
        self.stopping = False
        self._previous: dict[int, object] = {}

    def _note(self, signum: int, frame: object) -> None:
        del frame
        self.received = self.received or signum

    def fit_start(self, state: State, logger: Logger) -> None:
        del state, logger
        if threading.current_thread() is not threading.main_thread():
            log.warning("training runs outside the main thread: SIGTERM / SIGUSR1 end it without a checkpoint")
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)

    def batch_end(self, state: State, logger: Logger) -> None:
        del logger
        flag = torch.tensor([float(self.received or 0)])
        if dist.get_world_size() > 1:
            flag = state.device.tensor_to_device(flag)
            dist.all_reduce(flag, reduce_operation="MAX")
        if flag.item() and not self.stopping:
            self.received = self.received or int(flag.item())
            self.stopping = True
            log.warning("batch %d: %s received; writing a checkpoint at this batch, then stopping",
                        int(state.timestamp.batch), signal.Signals(self.received).name)

    def should_save(self, state: State, event: Event) -> bool:
        """Whether the checkpoint saver must write at this event: a batch's checkpoint event after a signal."""
        del state
        return self.stopping and event == Event.BATCH_CHECKPOINT

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        del logger
        batch = int(state.timestamp.batch)
        if self.stopping and batch < self.max_batches:
            dist.barrier()  # rank 0 links `latest` and mirrors after the saver's own barrier: no rank exits before
            for signum in self._previous:
                signal.signal(signum, signal.SIG_IGN)  # kept through the interpreter's shutdown, unlike a handler
            raise Preempted(batch, self.received)

    def fit_end(self, state: State, logger: Logger) -> None:
        del state, logger
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def save_schedule(interval: str, stop: PreemptionStop) -> Callable[[State, Event], bool]:
    """Composer's ``save_interval``: every ``interval`` and at the end of training, as a time string would give,
    and at the batch where ``stop`` stops the run."""
    periodic = create_interval_scheduler(interval)

    def due(state: State, event: Event) -> bool:
        return periodic(state, event) or stop.should_save(state, event)

    return due
