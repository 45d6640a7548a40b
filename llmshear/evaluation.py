"""Per-domain language-model loss and perplexity of a model on MDS evaluation data (outside Composer)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmshear.datasets.mds import open_domains
from llmshear.models.llama import LlamaLM

log = logging.getLogger(__name__)


@torch.no_grad()
def sequence_losses(model: LlamaLM, sequences: np.ndarray, batch_size: int) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) and token count over ``sequences`` ``(N, T)``."""
    total, tokens = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids = torch.as_tensor(sequences[start:start + batch_size].astype(np.int64))
        logits = model(ids)[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        tokens += ids[:, 1:].numel()
    return total, tokens


def evaluate_domains(model: LlamaLM, data: str | Path, domains: list[str], batch_size: int = 8,
                     max_seqs: int | None = None) -> dict:
    """Loss and perplexity per domain of ``data/<domain>`` (MDS), and their unweighted means.

    Args:
        model: the model (eval mode is set here).
        data: a split directory such as ``OUT/eval`` holding one MDS directory per domain.
        domains: the domains to evaluate.
        batch_size: sequences per forward pass.
        max_seqs: evaluate at most this many sequences per domain (the first ones).

    Returns:
        ``{"domains": {domain: {"loss", "ppl", "tokens"}}, "mean_loss", "mean_ppl"}``.
    """
    model.eval()
    opened = open_domains([Path(data) / d for d in domains])
    results = {}
    for name, domain in zip(domains, opened, strict=True):
        count = len(domain) if max_seqs is None else min(max_seqs, len(domain))
        sequences = np.stack([domain[i] for i in range(count)])
        total, tokens = sequence_losses(model, sequences, batch_size)
        loss = total / tokens
        results[name] = {"loss": loss, "ppl": math.exp(loss), "tokens": tokens}
        log.info("%s: loss %.4f, perplexity %.2f (%d tokens)", name, loss, math.exp(loss), tokens)
    mean = sum(r["loss"] for r in results.values()) / len(results)
    return {"domains": results, "mean_loss": mean, "mean_ppl": math.exp(mean)}


def format_table(results: dict[str, dict], metric: str = "ppl") -> str:
    """A plain-text table: one row per domain (and the mean), one column per model."""
    models = list(results)
    domains = list(next(iter(results.values()))["domains"])
    width = max(12, *(len(m) for m in models))
    rows = [f"{'domain':<16}" + "".join(f"{m:>{width + 2}}" for m in models)]
    for domain in domains:
        rows.append(f"{domain:<16}" + "".join(f"{results[m]['domains'][domain][metric]:>{width + 2}.3f}"
                                             for m in models))
    rows.append(f"{'mean':<16}" + "".join(f"{results[m]['mean_' + metric]:>{width + 2}.3f}" for m in models))
    return "\n".join(rows)
