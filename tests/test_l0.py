"""Hard-concrete masks, targets, expected size and the Lagrangian (llmshear.models.l0)."""

from __future__ import annotations

import math

import pytest
import torch

from llmshear.models.build import PRESETS, build_model
from llmshear.models.l0 import (
    LIMITS,
    TEMPERATURE,
    L0Module,
    TargetShape,
    deterministic_gates,
    l0_from_state_dict,
    mask_specs,
    params_of_masks,
    prob_nonzero,
    sample_gates,
)
from llmshear.models.llama import LlamaConfig

GQA = PRESETS["tiny-gqa"]()  # 96 wide, 4 layers, 8 heads / 2 KV heads, head_dim 16, intermediate 192
HALF_GQA = {"d_model": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 1, "intermediate_size": 96}


def _target(values: dict, source: LlamaConfig = GQA, structures=None) -> TargetShape:
    kwargs = {} if structures is None else {"structures": structures}
    return TargetShape.from_dict(values, source, **kwargs)


@pytest.mark.parametrize(
    ("values", "structures", "needles"),
    [
        ({"d_model": 128, "n_layers": 5}, None, ["target.d_model=128", "target.n_layers=5"]),
        ({"n_heads": 16, "n_kv_heads": 4}, None, ["target.n_heads=16", "target.n_kv_heads=4"]),
        ({"intermediate_size": 193}, None, ["target.intermediate_size=193 is larger"]),
        ({"n_heads": 6, "n_kv_heads": 4}, None, ["target.n_heads=6 is not a multiple of target.n_kv_heads=4"]),
        ({"n_heads": 8, "n_kv_heads": 1}, None, ["target.n_kv_heads=1: 8 query heads per KV head"]),
        ({"head_dim": 32}, None, ["target.head_dim=32 differs"]),
        ({"vocab_size": 100, "n_head": 4}, None, ["target.vocab_size=100 differs", "target.n_head: unknown key"]),
        ({"n_layers": 0, "d_model": "big"}, None, ["target.n_layers=0 must be", "target.d_model='big' must be"]),
        ({}, ["layer", "heads"], ["structures: unknown 'heads'"]),
        ({"d_model": 48, "n_layers": 2}, ["layer"], ["target.d_model=48 needs structure 'hidden'"]),
        ({"n_heads": 4, "n_kv_heads": 2}, ["kv_group"], ["target.n_heads=4 needs structure 'head'"]),
    ],
)
def test_bad_targets_name_every_problem(values, structures, needles):
    with pytest.raises(ValueError) as err:
        _target(values, structures=structures)
    for needle in needles:
        assert needle in str(err.value)


def test_missing_keys_keep_the_source_and_kv_heads_follow_the_heads():
    assert _target({}) == TargetShape(96, 4, 8, 2, 192)
    assert _target({"n_heads": 4}).n_kv_heads == 1  # groups of 4, as in the source
    assert _target({"n_heads": 2}).n_kv_heads == 1
    mha = PRESETS["tiny-llama2"]()
    assert _target({"n_heads": 2}, mha).n_kv_heads == 2  # MHA stays MHA
    smol = PRESETS["smollm2-135m"]()  # 9 heads / 3 KV heads
    assert _target({"n_heads": 6}, smol).n_kv_heads == 2
    assert _target({"n_heads": 4}, smol).n_kv_heads == 2  # groups of 2: fewest KV heads that hold 4 heads
    assert _target({"head_dim": 16, "vocab_size": 256}) == _target({})  # equal fixed keys are accepted


def test_mask_specs_table_rows_and_omitted_structures():
    specs = {s.name: s for s in mask_specs(GQA, _target(HALF_GQA | {"n_heads": 2}))}
    assert {n: (s.shape, s.units, s.keep) for n, s in specs.items()} == {
        "layer": ((4,), 4, 2),
        "kv_group": ((4, 2), 2, 1),
        "head": ((4, 2, 4), 4, 2),
        "intermediate": ((4, 192), 192, 96),
        "hidden": ((96,), 96, 48),
    }
    assert specs["head"].final_sparsity == pytest.approx(0.5)
    only_layers = mask_specs(GQA, _target({"n_layers": 3}))
    assert [(s.name, s.keep) for s in only_layers] == [("layer", 3)]
    assert mask_specs(GQA, _target({}, structures=["layer"]), ["layer"]) == []


def test_prob_nonzero_matches_sampling_and_samples_hit_exact_zero_and_one():
    log_alpha = torch.tensor([-2.0, 0.0, 1.5]).repeat(40000, 1)
    z = sample_gates(log_alpha)
    assert z.min() == 0 and z.max() == 1
    expected = torch.sigmoid(log_alpha[0] - TEMPERATURE * math.log(-LIMITS[0] / LIMITS[1]))
    torch.testing.assert_close(prob_nonzero(log_alpha[0]), expected)
    torch.testing.assert_close((z > 0).float().mean(0), expected, atol=0.01, rtol=0)


def test_deterministic_gates_keep_exactly_top_k_per_row_with_positive_values():
    log_alpha = torch.randn(4, 2, 4, generator=torch.Generator().manual_seed(0)) * 3 - 6  # mostly closed
    gates = deterministic_gates(log_alpha, 3)
    kept = gates != 0
    assert (kept.sum(-1) == 3).all()  # every (layer, KV group) keeps the same number of query heads
    assert (gates[kept] > 0).all()
    torch.testing.assert_close(gates[kept], prob_nonzero(log_alpha)[kept])
    # every kept logit is at least every pruned logit of its row
    low_kept = torch.where(kept, log_alpha, torch.inf).amin(-1)
    high_pruned = torch.where(kept, -torch.inf, log_alpha).amax(-1)
    assert (low_kept >= high_pruned).all()


@pytest.mark.parametrize("name", ["tiny-llama2", "tiny-gqa", "tiny-qwen2", "tiny-smollm2", "llama2-7b"])
def test_params_of_all_ones_equal_the_source_count(name):
    cfg = PRESETS[name]()
    model = build_model(cfg, device="meta")
    assert params_of_masks(cfg, {}).item() == model.num_params()
    full = {"layer": torch.ones(cfg.n_layers), "kv_group": torch.ones(cfg.n_layers, cfg.n_kv_heads),
            "head": torch.ones(cfg.n_layers, cfg.n_kv_heads, cfg.q_per_kv),
            "intermediate": torch.ones(cfg.n_layers, cfg.intermediate_size), "hidden": torch.ones(cfg.d_model)}
    assert params_of_masks(cfg, full).item() == model.num_params()


def test_expected_params_is_the_mean_over_independent_gate_draws():
    cfg = PRESETS["tiny-qwen2"]()  # biases and tied embeddings enter the count
    l0 = L0Module(cfg, _target({"d_model": 32, "n_layers": 2, "n_heads": 2, "intermediate_size": 64}, cfg))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in l0.log_alpha.values():
            p.copy_(torch.randn(p.shape, generator=generator) * 2)
    probs = l0.probabilities()
    draws = [params_of_masks(cfg, {n: torch.bernoulli(p, generator=generator) for n, p in probs.items()})
             for _ in range(4000)]
    mean, std = torch.stack(draws).mean(), torch.stack(draws).std()
    expected = l0.expected_params()
    assert abs(mean - expected) < 4 * std / math.sqrt(len(draws))
    expected.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in l0.log_alpha.values())


def test_forward_samples_in_training_and_is_deterministic_in_eval():
    l0 = L0Module(GQA, _target(HALF_GQA))
    sampled = l0.train()()
    assert {n: m.shape for n, m in sampled.items()} == {s.name: torch.Size(s.shape) for s in l0.specs}
    assert all(m.requires_grad for m in sampled.values())
    first, second = l0.eval()(), l0()
    for spec in l0.specs:
        assert torch.equal(first[spec.name], second[spec.name])
        assert ((first[spec.name] != 0).sum(-1) == spec.keep).all()


def test_target_sparsity_ramps_linearly_and_set_step_clamps():
    l0 = L0Module(GQA, _target(HALF_GQA), lagrangian_warmup=100, log_alpha_limit=3.0)
    final = {s.name: s.final_sparsity for s in l0.specs}
    for step, fraction in [(0, 0.0), (25, 0.25), (100, 1.0), (250, 1.0)]:
        l0.set_step(step)
        assert l0.target_sparsity() == pytest.approx({n: f * fraction for n, f in final.items()})
    assert all(p.max() == 3.0 for p in l0.log_alpha.values())  # initialised at 5, clamped to the limit


def test_lagrangian_loss_is_the_formula_and_parameters_are_named_for_the_optimizer():
    l0 = L0Module(GQA, _target(HALF_GQA))
    names = dict(l0.named_parameters())
    assert set(names) == {f"log_alpha.{s.name}" for s in l0.specs} | {
        f"lagrangian.lambda{i}.{s.name}" for s in l0.specs for i in (1, 2)}
    assert all(p.shape == (1,) for n, p in names.items() if n.startswith("lagrangian."))
    with torch.no_grad():
        for i, spec in enumerate(l0.specs):
            l0.lagrangian.lambda1[spec.name].fill_(0.5 + i)
            l0.lagrangian.lambda2[spec.name].fill_(2.0 - i)
    expected, target = l0.expected_sparsity(), l0.target_sparsity()
    formula = sum((0.5 + i) * (expected[s.name] - target[s.name]) + (2.0 - i) * (expected[s.name] - target[s.name])
                  ** 2 for i, s in enumerate(l0.specs))
    assert l0.lagrangian_loss().dim() == 0  # added to the scalar LM loss
    torch.testing.assert_close(l0.lagrangian_loss(), formula.float())


def _optimizer(l0: L0Module, lr: float = 0.1) -> torch.optim.Optimizer:
    # maximize=True plays the role of the negative learning rate the training recipe gives the multipliers.
    return torch.optim.Adam([{"params": list(l0.log_alpha.parameters()), "lr": lr},
                             {"params": list(l0.lagrangian.parameters()), "lr": lr, "maximize": True}])


def test_lambda_grows_while_the_expected_sparsity_lags_its_target():
    l0 = L0Module(GQA, _target(HALF_GQA))
    l0.log_alpha.requires_grad_(False)  # the gates cannot move: sparsity stays ~0, below the 0.5 target
    optimizer = _optimizer(l0)
    history = []
    for _ in range(20):
        optimizer.zero_grad()
        l0.lagrangian_loss().backward()
        optimizer.step()
        history.append((l0.lagrangian.lambda1["hidden"].item(), l0.lagrangian.lambda2["hidden"].item()))
    gap = (l0.expected_sparsity()["hidden"] - l0.target_sparsity()["hidden"]).item()
    assert gap < -0.4
    lambda1, lambda2 = zip(*history, strict=True)
    # dL/dλ1 = ŝ - t < 0: ascent drives λ1 down, which rewards sparsity; dL/dλ2 = (ŝ - t)² > 0 drives λ2 up.
    assert all(b < a for a, b in zip(lambda1, lambda1[1:], strict=False)) and lambda1[-1] < -1.0
    assert all(b > a for a, b in zip(lambda2, lambda2[1:], strict=False)) and lambda2[-1] > 1.0


def test_lagrangian_pulls_expected_sparsity_to_the_ramped_target():
    torch.manual_seed(0)
    l0 = L0Module(GQA, _target(HALF_GQA | {"n_heads": 2}), lagrangian_warmup=100)
    optimizer = _optimizer(l0)
    for step in range(300):
        l0.set_step(step)
        # Stand-in for the LM loss, which prefers open gates: the constraint has to win against it.
        task = -0.01 * sum(p.mean() for p in l0.probabilities().values())
        optimizer.zero_grad()
        (task + l0.lagrangian_loss()).backward()
        optimizer.step()
    expected, target = l0.expected_sparsity(), l0.target_sparsity()
    for spec in l0.specs:
        assert target[spec.name] == spec.final_sparsity
        assert abs(expected[spec.name].item() - spec.final_sparsity) < 0.01, spec.name


def test_state_dict_resumes_and_carries_config_and_target():
    l0 = L0Module(GQA, _target(HALF_GQA), ["layer", "kv_group", "intermediate", "hidden"], lagrangian_warmup=7)
    with torch.no_grad():
        for p in l0.parameters():
            p.normal_()
    l0.set_step(42)
    state = l0.state_dict()
    assert state["_extra_state"]["target"] == HALF_GQA
    rebuilt = l0_from_state_dict(state)
    assert rebuilt.source == GQA and rebuilt.structures == l0.structures and rebuilt.options == l0.options
    assert rebuilt.step.item() == 42
    for key, value in rebuilt.state_dict().items():
        if key != "_extra_state":
            assert torch.equal(value, state[key]), key
    other = L0Module(GQA, _target(HALF_GQA | {"n_layers": 3}))
    with pytest.raises(ValueError, match="target"):
        other.load_state_dict(state, strict=False)
