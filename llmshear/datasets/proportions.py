"""Domain proportions: validation, update rules keyed by name, floor / cap, and the ``proportions.json`` a run
writes at its end (and a later run's ``data.proportions_from`` reads).

Everything here is a pure function of its arguments (numpy float64 in, float64 out), so every rank that feeds
it the same all-reduced losses computes the same proportions.

Validation comes in two forms: ``*_errors`` functions return a list of messages (empty when fine), each
naming the config key, for the config validator to collect; :func:`validate_proportions` raises
``ValueError`` with those messages for code that wants to fail at once.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmshear.files import replace_json

TOLERANCE = 1e-4
PROPORTIONS_FILE = "proportions.json"


def write_domain_values(path: str | Path, domains: Sequence[str], key: str, values: Sequence[float]) -> None:
    """``{"domains": [...], key: [...]}`` as indented JSON at ``path``, replacing it only once complete."""
    replace_json(path, {"domains": list(domains), key: [float(v) for v in values]}, indent=2)


def read_domain_values(path: str | Path, domains: Sequence[str], key: str) -> list[float]:
    """``content[key]`` of a JSON file ``{"domains": [...], key: [...]}``, reordered to ``domains``.

    Reads the ``proportions.json`` a run writes into its folder at the end (``key="proportions"``) and the JSON
    line of ``scripts/reference_loss.py`` (``key="reference_losses"``).

    Raises:
        ValueError: unreadable file, or its domains are not the same set as ``domains``.
    """
    try:
        content = json.loads(Path(path).read_text())
        mapping = dict(zip(content["domains"], content[key], strict=True))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read {key} from {path}: {err!r}") from err
    if set(mapping) != set(domains):
        raise ValueError(f"{path} has domains {sorted(mapping)}, the config has {sorted(domains)}")
    return [float(mapping[d]) for d in domains]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def proportion_errors(proportions: Sequence[float], domains: Sequence[str] | None = None,
                      key: str = "data.proportions", tolerance: float = TOLERANCE) -> list[str]:
    """Problems of a proportion vector: length differs from ``domains``, negative / non-finite, sum ≠ 1."""
    values = list(proportions)
    problems = []
    if domains is not None and len(values) != len(domains):
        problems.append(f"{key}: {len(values)} values for {len(domains)} domains {list(domains)}")
    if not values:
        return problems + [f"{key}: empty"]
    if not all(_is_number(v) and v >= 0 for v in values):
        problems.append(f"{key}={values}: every value must be a finite number >= 0")
    elif abs(sum(values) - 1.0) > tolerance:
        problems.append(f"{key}={values}: must sum to 1 (sum {sum(values):.6g}, tolerance {tolerance:g})")
    return problems


def validate_proportions(proportions: Sequence[float], domains: Sequence[str] | None = None,
                         key: str = "data.proportions", tolerance: float = TOLERANCE) -> np.ndarray:
    """The proportions as a float64 array renormalised to sum exactly to 1.

    Raises:
        ValueError: with every message of :func:`proportion_errors`.
    """
    problems = proportion_errors(proportions, domains, key, tolerance)
    if problems:
        raise ValueError("; ".join(problems))
    values = np.asarray(proportions, dtype=np.float64)
    return values / values.sum()


def reference_loss_errors(reference_losses: Sequence[float] | None, domains: Sequence[str], rule: str = "doremi",
                          key: str = "data.reference_losses") -> list[str]:
    """Problems of the reference losses: missing while ``rule`` needs them, wrong length, not finite."""
    if reference_losses is None:
        return [f"{key}: required by data.update={rule}"] if rule in RULES and RULES[rule].needs_reference else []
    values = list(reference_losses)
    problems = []
    if len(values) != len(domains):
        problems.append(f"{key}: {len(values)} values for {len(domains)} domains {list(domains)}")
    if not all(_is_number(v) for v in values):
        problems.append(f"{key}={values}: every value must be a finite number")
    return problems


def bounds_errors(floor: float, cap: float, num_domains: int, prefix: str = "data.") -> list[str]:
    """Problems of ``floor`` / ``cap``: each in [0, 1], and ``floor·k <= 1 <= cap·k`` so a solution exists."""
    problems = []
    if not 0 <= floor <= 1:
        problems.append(f"{prefix}floor={floor}: must lie in [0, 1]")
    if not 0 < cap <= 1:
        problems.append(f"{prefix}cap={cap}: must lie in (0, 1]")
    if not problems and floor * num_domains > 1 + TOLERANCE:
        problems.append(f"{prefix}floor={floor}: {num_domains} domains x floor exceeds 1")
    if not problems and cap * num_domains < 1 - TOLERANCE:
        problems.append(f"{prefix}cap={cap}: {num_domains} domains x cap is below 1")
    return problems


def doremi(proportions: np.ndarray, losses: np.ndarray, reference_losses: np.ndarray, eta: float = 1.0,
           smoothing: float = 1e-4) -> np.ndarray:
    """Exponentiated-gradient step of Sheared-LLaMA / DoReMi.

    ``w ← softmax(log w + eta·(ℓ − ℓ_ref))``, then ``w ← (1 − smoothing)·w + smoothing / k`` so no domain
    reaches exactly zero. Domains whose loss lags their reference (ℓ > ℓ_ref) gain weight.
    """
    with np.errstate(divide="ignore"):  # a zero weight stays zero before smoothing: log 0 = -inf
        logits = np.log(proportions) + eta * (losses - reference_losses)
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    return (1.0 - smoothing) * weights + smoothing / len(weights)


def constant(proportions: np.ndarray, losses: np.ndarray, reference_losses: np.ndarray | None) -> np.ndarray:
    """Keep the proportions as they are (the static-mixture baseline)."""
    del losses, reference_losses
    return proportions.copy()


@dataclass(frozen=True)
class Rule:
    """A proportion update rule (``data.update``): its function ``(proportions, losses, reference_losses,
    **params) -> proportions``, the ``data.*`` keys it takes as parameters, whether it needs reference losses.
    Adding a rule is one entry in :data:`RULES` (and its parameters' keys in the config schema)."""

    update: Callable[..., np.ndarray]
    params: tuple[str, ...] = ()
    needs_reference: bool = False


RULES = {"doremi": Rule(doremi, ("eta", "smoothing"), needs_reference=True), "constant": Rule(constant)}


def clip_proportions(weights: np.ndarray, floor: float = 0.0, cap: float = 1.0) -> np.ndarray:
    """Move weights into ``[floor, cap]`` keeping the sum at 1 and the ratios of the unbounded ones.

    The result is ``clip(t·w, floor, cap)`` for the scale ``t`` at which it sums to 1 (found by bisection:
    the sum grows with ``t``), so weights strictly inside the bounds keep their ratios.

    Args:
        weights: ``(k,)`` non-negative, summing to 1.
        floor, cap: bounds with ``floor·k <= 1 <= cap·k`` (see :func:`bounds_errors`).

    Returns:
        ``(k,)`` float64 with every value in ``[floor, cap]`` (to rounding) and sum 1.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.min() >= floor and weights.max() <= cap:
        return weights / weights.sum()
    positive = np.maximum(weights, 1e-12)  # a zero weight can still be lifted to the floor

    def total(scale: float) -> float:
        return float(np.clip(scale * positive, floor, cap).sum())

    low, high = 0.0, 1.0
    while total(high) < 1.0 and high < 1e300:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if total(middle) < 1.0 else (low, middle)
    out = np.clip(high * positive, floor, cap)
    return out / out.sum()


def update_proportions(rule: str, proportions: Sequence[float], losses: Sequence[float | None],
                       reference_losses: Sequence[float] | None = None, *, floor: float = 0.0, cap: float = 1.0,
                       **params) -> np.ndarray:
    """New proportions from the current ones and each domain's loss, by the rule named ``rule``.

    A domain whose loss is ``None`` or NaN (absent from the evaluation) keeps its weight exactly; the rule
    runs on the present domains with their share of the mass, so an absent domain neither gains nor loses.

    Args:
        rule: a key of :data:`RULES` (``doremi``, ``constant``).
        proportions: ``(k,)`` current weights, summing to 1.
        losses: ``(k,)`` eval loss per domain, ``None`` / NaN when absent.
        reference_losses: ``(k,)`` target losses (required by ``doremi``).
        floor, cap: bounds applied after the rule (see :func:`clip_proportions`).
        **params: the rule's parameters (``doremi``: ``eta``, ``smoothing``); parameters of other rules are
            ignored so one config can switch rules.

    Raises:
        ValueError: unknown rule (the known ones are listed), unknown parameter, bad lengths or bounds.
    """
    if rule not in RULES:
        raise ValueError(f"unknown proportion update rule {rule!r}; known rules: {sorted(RULES)}")
    known = {name for spec in RULES.values() for name in spec.params}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for rule {rule!r}; known: {sorted(known)}")
    weights = validate_proportions(proportions, key="proportions")
    problems = reference_loss_errors(reference_losses, ["?"] * len(weights), rule, "reference_losses")
    problems += bounds_errors(floor, cap, len(weights), prefix="")
    if len(losses) != len(weights):
        problems.append(f"losses: {len(losses)} values for {len(weights)} domains")
    if problems:
        raise ValueError("; ".join(problems))
    loss = np.array([np.nan if v is None else v for v in losses], dtype=np.float64)
    present = np.isfinite(loss)
    mass = weights[present].sum()
    out = weights.copy()
    if present.any() and mass > 0:
        reference = None if reference_losses is None else np.asarray(reference_losses, np.float64)[present]
        kwargs = {name: params[name] for name in RULES[rule].params if name in params}
        out[present] = RULES[rule].update(weights[present] / mass, loss[present], reference, **kwargs) * mass
    return clip_proportions(out, floor, cap)
