"""Dynamic batch loading: after each evaluation, re-weight the training domains by their loss gap.

A run's final proportions go to ``<save_folder>/proportions.json``
(:func:`~llmshear.datasets.proportions.write_domain_values`), which ``data.proportions_from`` of a later run
reads back (:func:`~llmshear.datasets.proportions.read_domain_values`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmshear.datasets.proportions import (
    PROPORTIONS_FILE,
    RULES,
    bounds_errors,
    reference_loss_errors,
    update_proportions,
    write_domain_values,
)
from llmshear.metrics import DomainCrossEntropy

log = logging.getLogger(__name__)

class DynamicLoadingCallback(Callback):
    """At ``eval_end``: per-domain eval losses → new proportions (``rule``) → the training dataset.

    The losses are the :class:`~llmshear.metrics.DomainCrossEntropy` values Composer has just computed;
    their ``compute()`` already summed the loss and token counts over all ranks, and the new proportions are
    broadcast from rank 0, so every rank sets bit-identical proportions (they are part of the dataset state
    that rank 0 checkpoints). The update takes effect from the next training batch.

    A domain absent from the evaluation (its loss is ``None``) keeps its weight exactly; the other domains
    share the rest (see :func:`~llmshear.datasets.proportions.update_proportions`).

    Logged at each update, for each domain ``d``: ``dynamic_loading/weight/d`` (the new weight),
    ``dynamic_loading/loss/d`` and ``dynamic_loading/gap/d`` (loss − reference; both only when present).

    Args:
        domains: ``data.domains``, in the order of the batches' domain index.
        rule: ``data.update`` — ``doremi`` or ``constant``.
        reference_losses: ``data.reference_losses`` (required by ``doremi``).
        eta: ``data.eta``, the step size of ``doremi``.
        smoothing: ``data.smoothing``, the uniform mixing ``c`` of ``doremi``.
        floor, cap: ``data.floor`` / ``data.cap``, bounds on every weight after the update.
        eval_label: the evaluator whose metrics drive the update.
        folder: the run folder; at ``fit_end`` rank 0 writes the final proportions to
            ``folder/proportions.json`` (None: not written).

    Raises:
        ValueError: unknown rule, missing or mis-sized reference losses, impossible bounds.
    """

    def __init__(self, domains: Sequence[str], rule: str = "doremi", reference_losses: Sequence[float] | None = None,
                 eta: float = 1.0, smoothing: float = 1e-4, floor: float = 0.0, cap: float = 1.0,
                 eval_label: str = "eval", folder: str | Path | None = None):
        if rule not in RULES:
            raise ValueError(f"data.update={rule!r}: unknown rule; known rules: {sorted(RULES)}")
        problems = reference_loss_errors(reference_losses, domains, rule) + bounds_errors(floor, cap, len(domains))
        if problems:
            raise ValueError("; ".join(problems))
        self.domains = list(domains)
        self.rule, self.eta, self.smoothing, self.floor, self.cap = rule, eta, smoothing, floor, cap
        self.reference_losses = None if reference_losses is None else [float(v) for v in reference_losses]
        self.eval_label = eval_label
        self.folder = None if folder is None else Path(folder)
        self.history: list[dict] = []
        self.fit_ended = False  # after FIT_END Composer may evaluate once more (eval_interval not dividing the run)

    def _dataset(self, state: State):
        dataset = getattr(state.train_dataloader, "dataset", None)
        if not hasattr(dataset, "set_proportions"):
            raise TypeError("DynamicLoadingCallback needs the train dataloader of "
                            "llmshear.datasets.dynamic.build_train_dataloader (a dataset with set_proportions)")
        if list(dataset.domains) != self.domains:
            raise ValueError(f"the train dataset's domains {dataset.domains} differ from data.domains {self.domains}")
        return dataset

    def read_losses(self, state: State) -> list[float | None]:
        """Each domain's loss from the evaluator's metrics (``None`` when the domain was absent).

        Raises:
            KeyError: the model has no :class:`DomainCrossEntropy` for some domain.
        """
        metrics = state.eval_metrics.get(self.eval_label, {}).values()
        found = {m.domain_name: m for m in metrics if isinstance(m, DomainCrossEntropy)}
        missing = [d for d in self.domains if d not in found]
        if missing:
            raise KeyError(f"evaluator {self.eval_label!r} has no DomainCrossEntropy metric for domains {missing}; "
                           "give the model llmshear.metrics.build_domain_metrics(domains) as eval metrics")
        values = [found[d].compute() for d in self.domains]  # cached by Composer's compute: no second sync
        return [None if v is None else float(v) for v in values]

    def fit_start(self, state: State, logger: Logger) -> None:
        weights = self._dataset(state).proportions
        logger.log_metrics({f"dynamic_loading/weight/{d}": w for d, w in zip(self.domains, weights, strict=True)})

    def eval_end(self, state: State, logger: Logger) -> None:
        if state.dataloader_label != self.eval_label or state.train_dataloader is None:
            return  # another evaluator, or an evaluation outside training (Trainer.eval): nothing to re-weight
        dataset = self._dataset(state)
        losses = self.read_losses(state)
        new = update_proportions(self.rule, dataset.proportions, losses, self.reference_losses, floor=self.floor,
                                 cap=self.cap, eta=self.eta, smoothing=self.smoothing).tolist()
        shared = [new]
        dist.broadcast_object_list(shared, src=0)
        new = shared[0]
        dataset.set_proportions(new)
        batch = int(state.timestamp.batch)
        self.history.append({"batch": batch, "losses": losses, "proportions": new})
        logger.log_metrics(self._metrics(losses, new))
        log.info("batch %d: proportions %s", batch, ", ".join(f"{d}={w:.4f}" for d, w in zip(self.domains, new,
                                                                                             strict=True)))
        if self.fit_ended:
            self.write_proportions(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self.fit_ended = True
        self.write_proportions(state)

    def write_proportions(self, state: State) -> None:
        """The current proportions to ``folder/proportions.json`` (rank 0, when a folder is set)."""
        if self.folder is None or dist.get_global_rank() != 0:
            return
        path = self.folder / PROPORTIONS_FILE
        write_domain_values(path, self.domains, "proportions", self._dataset(state).proportions)
        log.info("final domain proportions: %s", path)

    def _metrics(self, losses: list[float | None], weights: list[float]) -> dict[str, float]:
        metrics = {}
        for i, domain in enumerate(self.domains):
            metrics[f"dynamic_loading/weight/{domain}"] = weights[i]
            if losses[i] is not None:
                metrics[f"dynamic_loading/loss/{domain}"] = losses[i]
                if self.reference_losses is not None:
                    metrics[f"dynamic_loading/gap/{domain}"] = losses[i] - self.reference_losses[i]
        return metrics

    def state_dict(self) -> dict:
        """``{"domains", "history"}``: every update's batch, losses and proportions. The history is one JSON
        string: sharded checkpoints (torch.distributed.checkpoint) need the same keys at load as at save, and a
        list that grows with every update would not have them."""
        return {"domains": self.domains, "history": json.dumps(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("domains") != self.domains:
            raise ValueError(f"checkpointed dynamic loading has domains {state.get('domains')}, "
                             f"this run {self.domains}")
        history = state["history"]
        self.history = [dict(entry) for entry in (json.loads(history) if isinstance(history, str) else history)]
