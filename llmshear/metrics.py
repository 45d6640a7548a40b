"""Per-domain cross-entropy that is correct, and never NaN, when a domain is absent.

One metric instance per domain (not one metric returning a dict): Composer's ``Trainer`` calls ``compute()``
on each eval metric and logs ``metrics/<evaluator>/<name>: value``, and its loggers expect a number per name.
Each instance keeps two sums (token losses in float64, and token count); torchmetrics sums both over ranks
when ``compute()`` runs, so the loss is the exact token mean over the whole evaluation.

A domain with no token in the evaluation computes to ``None`` (explicitly absent): Composer's console logger
prints ``None``, the run's JSON-lines logger leaves it out, and the dynamic-loading callback keeps that
domain's weight. A division by a zero count never happens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from llmshear.batch import IGNORE_INDEX

PREFIX = "DomainCrossEntropy"


def metric_name(domain: str) -> str:
    """The name a domain's metric is registered (and logged) under: ``DomainCrossEntropy/<domain>``."""
    return f"{PREFIX}/{domain}"


class DomainMetric(Metric):
    """Base of metrics whose ``update`` also takes each sample's domain: ``update(logits, labels, domain)``."""


class DomainCrossEntropy(DomainMetric):
    """Mean next-token cross-entropy over the tokens of one domain.

    Args:
        domain_index: the value of ``batch["domain"]`` that selects this domain's samples.
        domain_name: its name (for logs and the dynamic-loading callback).
        ignore_index: label value of tokens that do not count.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, domain_index: int, domain_name: str, ignore_index: int = IGNORE_INDEX, **kwargs):
        super().__init__(**kwargs)
        self.domain_index, self.domain_name, self.ignore_index = domain_index, domain_name, ignore_index
        self.add_state("loss_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, domain: torch.Tensor) -> None:
        """Add the tokens of this domain's samples.

        Args:
            logits: ``(B, T, V)``, already aligned with ``labels`` (position t predicts ``labels[:, t]``).
            labels: ``(B, T)``; ``ignore_index`` marks tokens that do not count.
            domain: ``(B,)`` each sample's domain index.
        """
        rows = domain.to(labels.device) == self.domain_index
        if not bool(rows.any()):
            return
        picked = labels[rows]
        loss = F.cross_entropy(logits[rows].flatten(0, 1).float(), picked.flatten(), ignore_index=self.ignore_index,
                               reduction="sum")
        self.loss_sum += loss.double()
        self.tokens += (picked != self.ignore_index).sum()

    def compute(self) -> torch.Tensor | None:
        """The mean loss (a 0-d float tensor), or ``None`` when the domain had no token."""
        if int(self.tokens) == 0:
            return None
        return (self.loss_sum / self.tokens).float()


def build_domain_metrics(domains: Sequence[str], ignore_index: int = IGNORE_INDEX) -> dict[str, DomainCrossEntropy]:
    """One :class:`DomainCrossEntropy` per domain, keyed by :func:`metric_name`, for a ComposerModel's eval metrics."""
    return {metric_name(name): DomainCrossEntropy(i, name, ignore_index) for i, name in enumerate(domains)}


@torch.no_grad()
def domain_losses(model: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict], domains: Sequence[str],
                  device: str | torch.device = "cpu") -> dict[str, list]:
    """Per-domain mean next-token loss of ``model`` over ``batches`` (e.g. an eval dataloader).

    Args:
        model: maps ``input_ids`` ``(B, T)`` to logits ``(B, T, V)``.
        batches: dicts with ``input_ids``, ``labels`` ``(B, T)`` and ``domain`` ``(B,)``.
        domains: the names, in domain-index order.
        device: where the model runs.

    Returns:
        ``{"losses": [float | None per domain], "tokens": [int per domain]}``.
    """
    metrics = [DomainCrossEntropy(i, name).to(device) for i, name in enumerate(domains)]
    for batch in batches:
        logits = model(batch["input_ids"].to(device))[:, :-1]
        labels = batch["labels"].to(device)[:, 1:]
        for metric in metrics:
            metric.update(logits, labels, batch["domain"])
    losses = [metric.compute() for metric in metrics]
    return {"losses": [None if v is None else float(v) for v in losses],
            "tokens": [int(metric.tokens) for metric in metrics]}
