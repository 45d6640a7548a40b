"""Proportion rules, bounds, validation messages and the scaling-law fit (llmshear.datasets.proportions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmshear.datasets.proportions import (
    RULES,
    bounds_errors,
    clip_proportions,
    proportion_errors,
    reference_loss_errors,
    update_proportions,
    validate_proportions,
)
from llmshear.datasets.reference import fit_scaling_law, predict_loss

# Worked example, by hand: w = (0.5, 0.3, 0.2), ℓ − ℓ_ref = (0.2, −0.1, 0.5), η = 1, c = 1e-4.
#   w·e^Δ = (0.5·e^0.2, 0.3·e^−0.1, 0.2·e^0.5) = (0.610701, 0.271451, 0.329744), sum 1.211897
#   softmax = (0.503922, 0.223989, 0.272089); (1 − c)·w + c/3 = (0.503905, 0.224000, 0.272095)
EXAMPLE = {"proportions": [0.5, 0.3, 0.2], "losses": [2.0, 1.5, 3.0], "reference_losses": [1.8, 1.6, 2.5]}
EXPECTED = [0.5039048506, 0.2239996539, 0.2720954955]


def test_doremi_matches_worked_example():
    new = update_proportions("doremi", **EXAMPLE, eta=1.0, smoothing=1e-4)
    np.testing.assert_allclose(new, EXPECTED, rtol=0, atol=1e-9)
    assert math.isclose(new.sum(), 1.0, abs_tol=1e-12)


def test_doremi_eta_and_smoothing_matter():
    assert not np.allclose(update_proportions("doremi", **EXAMPLE, eta=2.0), EXPECTED, atol=1e-4)
    uniform = update_proportions("doremi", **EXAMPLE, smoothing=1.0 - 1e-12)
    np.testing.assert_allclose(uniform, [1 / 3] * 3, atol=1e-9)


def test_lagging_domain_gains_and_ahead_domain_loses():
    new = update_proportions("doremi", [0.25] * 4, [3.0, 2.0, 2.0, 1.0], [2.0, 2.0, 2.0, 2.0])
    assert new[0] > 0.25 > new[3]
    assert math.isclose(new[1], new[2])


def test_constant_keeps_proportions_and_ignores_doremi_params():
    new = update_proportions("constant", [0.7, 0.3], [9.0, 1.0], None, eta=5.0, smoothing=0.5)
    np.testing.assert_allclose(new, [0.7, 0.3])


def test_unknown_rule_names_it_and_the_known_ones():
    with pytest.raises(ValueError, match=r"'exponential'.*\['constant', 'doremi'\]"):
        update_proportions("exponential", [0.5, 0.5], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="unknown parameter.*'lr'"):
        update_proportions("doremi", [0.5, 0.5], [1.0, 1.0], [1.0, 1.0], lr=1.0)
    assert set(RULES) == {"doremi", "constant"}


def test_doremi_needs_reference_losses_of_the_right_length():
    with pytest.raises(ValueError, match="reference_losses: required"):
        update_proportions("doremi", [0.5, 0.5], [1.0, 1.0], None)
    with pytest.raises(ValueError, match="reference_losses: 3 values for 2"):
        update_proportions("doremi", [0.5, 0.5], [1.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="losses: 1 values for 2"):
        update_proportions("doremi", [0.5, 0.5], [1.0], [1.0, 1.0])


@pytest.mark.parametrize("absent", [None, float("nan")])
def test_absent_domain_keeps_its_weight_exactly(absent):
    new = update_proportions("doremi", [0.5, 0.3, 0.2], [2.0, absent, 3.0], [1.8, 1.6, 2.5])
    assert new[1] == pytest.approx(0.3, abs=1e-15)
    assert np.all(np.isfinite(new)) and math.isclose(new.sum(), 1.0, abs_tol=1e-12)
    # the present domains move among themselves exactly as a two-domain update would
    two = update_proportions("doremi", [0.5 / 0.7, 0.2 / 0.7], [2.0, 3.0], [1.8, 2.5])
    np.testing.assert_allclose(new[[0, 2]], two * 0.7, atol=1e-12)


def test_all_domains_absent_is_a_no_op():
    new = update_proportions("doremi", [0.6, 0.4], [None, None], [1.0, 1.0])
    np.testing.assert_allclose(new, [0.6, 0.4])


def test_floor_and_cap_prevent_collapse_and_takeover():
    # without bounds, 30 updates of a large gap push one domain to almost everything
    weights = np.full(4, 0.25)
    bounded = weights.copy()
    for _ in range(30):
        losses = [4.0, 2.0, 2.0, 2.0]
        weights = update_proportions("doremi", weights, losses, [2.0] * 4)
        bounded = update_proportions("doremi", bounded, losses, [2.0] * 4, floor=0.05, cap=0.6)
    assert weights[0] > 0.99
    assert bounded.max() <= 0.6 + 1e-12 and bounded.min() >= 0.05 - 1e-12
    assert math.isclose(bounded.sum(), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize(("weights", "floor", "cap"), [
    ([0.94, 0.02, 0.02, 0.02], 0.05, 0.5),
    ([0.97, 0.01, 0.01, 0.01], 0.0, 0.4),
    ([0.0, 0.0, 0.5, 0.5], 0.1, 1.0),
    ([0.25, 0.25, 0.25, 0.25], 0.25, 0.25),
])
def test_clip_respects_bounds_and_sum(weights, floor, cap):
    out = clip_proportions(np.array(weights), floor, cap)
    assert math.isclose(out.sum(), 1.0, abs_tol=1e-12)
    assert out.min() >= floor - 1e-12 and out.max() <= cap + 1e-12


def test_impossible_bounds_are_errors():
    assert bounds_errors(0.3, 1.0, 4) == ["data.floor=0.3: 4 domains x floor exceeds 1"]
    assert bounds_errors(0.0, 0.2, 4) == ["data.cap=0.2: 4 domains x cap is below 1"]
    with pytest.raises(ValueError, match="floor=0.6"):
        update_proportions("constant", [0.5, 0.5], [1.0, 1.0], floor=0.6)


def test_proportion_errors_name_the_key():
    assert proportion_errors([0.5, 0.5], ["a", "b"]) == []
    assert proportion_errors([0.5, 0.4], ["a", "b"]) == [
        "data.proportions=[0.5, 0.4]: must sum to 1 (sum 0.9, tolerance 0.0001)"]
    assert proportion_errors([0.5, 0.5], ["a", "b", "c"]) == [
        "data.proportions: 2 values for 3 domains ['a', 'b', 'c']"]
    assert "finite number >= 0" in proportion_errors([1.5, -0.5], ["a", "b"], key="x")[0]
    assert proportion_errors([], None) == ["data.proportions: empty"]


def test_validate_proportions_raises_and_renormalises():
    out = validate_proportions([0.50004, 0.5], ["a", "b"])
    assert out.sum() == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match=r"data\.proportions=\[0\.2, 0\.2\]: must sum to 1"):
        validate_proportions([0.2, 0.2], ["a", "b"])


def test_reference_loss_errors():
    assert reference_loss_errors([1.0, 2.0], ["a", "b"]) == []
    assert reference_loss_errors(None, ["a"], rule="constant") == []
    assert reference_loss_errors(None, ["a"]) == ["data.reference_losses: required by data.update=doremi"]
    assert "2 values for 1" in reference_loss_errors([1.0, 2.0], ["a"])[0]
    assert "finite" in reference_loss_errors([float("inf")], ["a"])[0]


def test_scaling_law_fit_recovers_a_known_law():
    a, b, c = 420.0, 0.3, 1.7
    sizes = [1.25e8, 3.5e8, 7.5e8, 1.5e9, 7e9]
    losses = [a / n ** b + c for n in sizes]
    fit = fit_scaling_law(sizes, losses)
    assert fit[1] == pytest.approx(b, rel=1e-3)
    assert predict_loss(fit, 1.3e9) == pytest.approx(a / 1.3e9 ** b + c, abs=1e-4)


def test_scaling_law_fit_is_robust_to_noise_and_flat_data():
    rng = np.random.default_rng(0)
    sizes = np.array([1e8, 3e8, 1e9, 3e9])
    noisy = 50.0 / sizes ** 0.25 + 2.0 + rng.normal(0, 1e-3, size=4)
    assert predict_loss(fit_scaling_law(sizes, noisy), 2e9) == pytest.approx(50.0 / 2e9 ** 0.25 + 2.0, abs=0.01)
    flat = fit_scaling_law(sizes, [2.0, 2.1, 2.05, 2.2])  # grows with size: the flat law is the best non-increasing
    assert predict_loss(flat, 5e9) == pytest.approx(np.mean([2.0, 2.1, 2.05, 2.2]))


def test_scaling_law_fit_rejects_too_few_sizes():
    with pytest.raises(ValueError, match="three or more distinct sizes"):
        fit_scaling_law([1e8, 1e8, 1e9], [3.0, 3.0, 2.0])


@pytest.mark.parametrize(("weights", "floor", "cap"), [
    ([0.70, 0.12, 0.08, 0.06, 0.04], 0.05, 0.5),  # one capped, one floored, three inside keep their ratios
    ([0.01, 0.30, 0.45, 0.24], 0.1, 1.0),  # only the floor binds
    ([0.80, 0.10, 0.06, 0.04], 0.0, 0.6),  # only the cap binds
])
def test_clipped_weights_inside_the_bounds_keep_their_ratios(weights, floor, cap):
    """docs/data.md: a bound moves only the weights it binds; the others are scaled together, not made uniform."""
    weights = np.array(weights)
    out = clip_proportions(weights, floor, cap)
    inside = (out > floor + 1e-9) & (out < cap - 1e-9)
    assert inside.sum() >= 2
    ratios = out[inside] / weights[inside]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-6)
    assert all(math.isclose(x, floor, abs_tol=1e-9) or math.isclose(x, cap, abs_tol=1e-9) for x in out[~inside])
    assert not np.allclose(out[inside], out[inside][0])  # not uniform
