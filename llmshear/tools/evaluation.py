"""Per-domain language-model loss and perplexity of a model on MDS evaluation data (outside Composer)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from llmshear.datasets.dynamic import DomainEvalDataset
from llmshear.datasets.mds import open_domains
from llmshear.metrics import domain_losses
from llmshear.models.llama import LlamaLM
from llmshear.progress import progress as report

log = logging.getLogger(__name__)


def check_device(device: str) -> None:
    """Fail before any model is loaded on a device string torch cannot parse or a GPU this machine lacks.

    Raises:
        ValueError: naming ``--device``.
    """
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r}: {err}") from err
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def mean_domain_losses(model, data: str | Path, domains: Sequence[str], batch_size: int = 4,
                       max_seqs: int | None = None, device: str = "cpu", progress: bool = False) -> dict:
    """Per-domain mean next-token loss of ``model`` on ``data/<domain>`` (every sequence, or the first ``max_seqs``).

    Of the source model, these are the "source reference" losses (``scripts/reference_loss.py``).

    Args:
        model: a :class:`~llmshear.models.llama.LlamaLM` (``input_ids`` ``(B, T)`` to logits ``(B, T, V)``); token
            ids above its vocabulary are refused, naming the shard, where the data records no bound.
        data: the eval split directory (``OUT/eval``).
        domains: which domains, in output order.
        batch_size: sequences per forward pass.
        max_seqs: at most this many sequences per domain.
        device: where the model runs.
        progress: report progress over batches (a bar on a terminal, else log lines; see
            :func:`llmshear.progress.progress`).

    Returns:
        ``{"domains", "losses", "tokens"}``.

    Raises:
        ValueError: a domain without any evaluated token.
    """
    sources = open_domains([Path(data) / d for d in domains], vocab_size=model.cfg.vocab_size)
    if max_seqs is not None:
        sources = [Subset(s, range(min(max_seqs, len(s)))) for s in sources]
    loader = DataLoader(DomainEvalDataset(sources, domains, rank=0, world_size=1), batch_size=batch_size)
    batches = report(loader, len(loader), "eval", "batch", enabled=None if progress else False)
    result = domain_losses(model, batches, domains, device)
    empty = [d for d, n in zip(domains, result["tokens"], strict=True) if n == 0]
    if empty:
        raise ValueError(f"no evaluated tokens for domains {empty}")
    return {"domains": list(domains), "losses": result["losses"], "tokens": result["tokens"]}


def evaluate_domains(model: LlamaLM, data: str | Path, domains: list[str], batch_size: int = 8,
                     max_seqs: int | None = None, device: str = "cpu", progress: bool = False) -> dict:
    """Loss and perplexity per domain of ``data/<domain>`` (MDS), and their unweighted means.

    Args:
        model: the model (eval mode is set here).
        data: a split directory such as ``OUT/eval`` holding one MDS directory per domain.
        domains: the domains to evaluate.
        batch_size: sequences per forward pass.
        max_seqs: evaluate at most this many sequences per domain (the first ones).
        device: where the model is (batches are moved there).
        progress: report progress over batches (a bar on a terminal, else log lines at an interval).

    Returns:
        ``{"domains": {domain: {"loss", "ppl", "tokens"}}, "mean_loss", "mean_ppl"}``.
    """
    model.eval()
    result = mean_domain_losses(model, data, domains, batch_size, max_seqs, device, progress)
    per_domain = {}
    for name, loss, tokens in zip(domains, result["losses"], result["tokens"], strict=True):
        per_domain[name] = {"loss": loss, "ppl": math.exp(loss), "tokens": tokens}
        log.info("%s: loss %.4f, perplexity %.2f (%d tokens)", name, loss, math.exp(loss), tokens)
    mean = sum(r["loss"] for r in per_domain.values()) / len(per_domain)
    return {"domains": per_domain, "mean_loss": mean, "mean_ppl": math.exp(mean)}


def format_table(results: dict[str, dict], metric: str = "ppl") -> str:
    """A plain-text table: one row per domain (and the mean), one column per model."""
    models = list(results)
    domains = list(next(iter(results.values()))["domains"])
    width = max(12, *(len(m) for m in models)) + 2
    rows = [f"{'domain':<16}" + "".join(f"{m:>{width}}" for m in models)]
    for domain in domains:
        rows.append(f"{domain:<16}" + "".join(f"{results[m]['domains'][domain][metric]:>{width}.3f}" for m in models))
    rows.append(f"{'mean':<16}" + "".join(f"{results[m]['mean_' + metric]:>{width}.3f}" for m in models))
    return "\n".join(rows)
