"""Reference losses per domain: a scaling law fitted over model sizes, and the eval split's domains.

Both references give one number per domain, in domain order, for ``data.reference_losses``: the loss the pruned
model should reach on each domain (Sheared-LLaMA's "scaling reference" here; its "source reference", the source
model's own eval loss, is :func:`llmshear.tools.evaluation.mean_domain_losses` of the source).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmshear.datasets.mds import SUMMARY


def eval_domains(data: str | Path) -> list[str]:
    """The domains of an eval split directory: the order of ``../summary.json`` when present, else sorted names.

    Raises:
        FileNotFoundError: no domain directory with an ``index.json``.
    """
    data = Path(data)
    present = sorted(p.name for p in data.iterdir() if (p / "index.json").is_file()) if data.is_dir() else []
    if not present:
        raise FileNotFoundError(f"--data {data}: no <domain>/index.json (expected OUT/eval from prepare_data.py)")
    summary = data.parent / SUMMARY
    if summary.is_file():
        ordered = [d for d in json.loads(summary.read_text()).get("domains", {}) if d in present]
        if sorted(ordered) == present:
            return ordered
    return present


def split_fingerprints(split: str | Path, domains: Sequence[str]) -> dict[str, str]:
    """Per domain, a SHA-256 of its ``index.json`` and shard files in ``split``: the same samples give the same
    value wherever the split was copied; another preparation (tokenizer, sequence length, documents) another."""
    prints = {}
    for domain in domains:
        folder = Path(split) / domain
        index = (folder / "index.json").read_bytes()
        digest = hashlib.sha256(index)
        for shard in json.loads(index)["shards"]:
            with open(folder / shard["raw_data"]["basename"], "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
        prints[domain] = digest.hexdigest()
    return prints


def fit_scaling_law(sizes: Sequence[float], losses: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares fit of ``L(N) = a / N**b + c`` with ``a >= 0``, ``b`` in (0, 3].

    For a fixed ``b`` the model is linear in ``(a, c)``, so ``b`` is searched (a log grid, then a
    golden-section refinement) and ``(a, c)`` solved exactly for each: no starting point to get wrong.

    Args:
        sizes: parameter counts, at least three distinct positive values.
        losses: the loss at each size.

    Returns:
        ``(a, b, c)``.

    Raises:
        ValueError: fewer than three distinct sizes, or non-finite / non-positive values.
    """
    n = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if len(n) != len(y) or len(np.unique(n)) < 3:
        raise ValueError(f"need losses at three or more distinct sizes, got sizes {list(n)} and {len(y)} losses")
    if not (np.all(np.isfinite(n)) and np.all(n > 0) and np.all(np.isfinite(y))):
        raise ValueError(f"sizes must be positive and losses finite: {list(n)}, {list(y)}")
    scale = float(np.exp(np.log(n).mean()))
    x = n / scale

    def solve(b: float) -> tuple[float, float, float]:
        design = np.stack([x ** -b, np.ones_like(x)], axis=1)
        (a, c), *_ = np.linalg.lstsq(design, y, rcond=None)
        if a < 0:  # losses that grow with size: the best non-increasing law is flat
            a, c = 0.0, float(y.mean())
        residual = float(np.sum((a * x ** -b + c - y) ** 2))
        return residual, a, c

    grid = np.logspace(-3, math.log10(3.0), 200)
    best = int(np.argmin([solve(b)[0] for b in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, m2) if solve(m1)[0] <= solve(m2)[0] else (m1, hi)
    b = (lo + hi) / 2
    _, a, c = solve(b)
    return float(a * scale ** b), float(b), float(c)


def predict_loss(fit: tuple[float, float, float], size: float) -> float:
    """``a / size**b + c`` for ``fit = (a, b, c)``."""
    a, b, c = fit
    return a / size ** b + c


def read_sizes(path: str | Path) -> tuple[list[str], list[float], list[list[float]]]:
    """``(domains, parameter counts, losses per model)`` from a sizes file.

    The file is ``{"domains": [...], "models": [{"params": N, "losses": [...]}, ...]}``; a model may give
    ``reference_losses`` instead of ``losses`` (the JSON line that ``reference_loss.py --source`` prints).

    Raises:
        ValueError: unreadable JSON, or an entry of the wrong shape (the file and entry are named).
    """
    try:
        content = json.loads(Path(path).read_text())
        domains, models = list(content["domains"]), list(content["models"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected {{'domains': [...], 'models': [...]}}: {err}") from err
    sizes, losses = [], []
    for i, model in enumerate(models):
        values = model.get("losses", model.get("reference_losses")) if isinstance(model, dict) else None
        params = model.get("params") if isinstance(model, dict) else None
        if not isinstance(params, int | float) or params <= 0 or not isinstance(values, list):
            raise ValueError(f"{path}: models[{i}] needs a positive 'params' and a 'losses' list")
        if len(values) != len(domains) or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise ValueError(f"{path}: models[{i}].losses must be {len(domains)} finite numbers (one per domain)")
        sizes.append(float(params))
        losses.append([float(v) for v in values])
    return domains, sizes, losses


def scaling_reference(path: str | Path, target_params: float) -> dict:
    """Fit ``L(N) = a/N^b + c`` per domain over the models of a sizes file and predict ``target_params``.

    Returns:
        ``{"domains", "reference_losses", "target_params", "fits": {domain: {"a", "b", "c"}}}``.
    """
    if not target_params > 0:
        raise ValueError(f"--target-params {target_params}: must be positive")
    domains, sizes, losses = read_sizes(path)
    table = np.asarray(losses)
    fits = {d: fit_scaling_law(sizes, table[:, i]) for i, d in enumerate(domains)}
    return {"domains": domains, "reference_losses": [predict_loss(fits[d], target_params) for d in domains],
            "target_params": target_params, "fits": {d: dict(zip("abc", f, strict=True)) for d, f in fits.items()}}


def yaml_list(result: dict, comment: str) -> str:
    """``reference_losses:`` as a YAML block list, one line per domain with its name as a comment."""
    lines = [f"# {comment}", "reference_losses:"]
    lines += [f"  - {loss:.4f}  # {domain}" for domain, loss in zip(result["domains"], result["reference_losses"],
                                                                      strict=True)]
    return "\n".join(lines)
