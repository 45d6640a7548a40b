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
    expected_gates,
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


def test_deterministic_gates_rank_by_scores_with_logits_breaking_ties():
    log_alpha = torch.tensor([[0.0, 2.0, 5.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    scores = torch.tensor([[1.0, 1.0, 0.0, 1.0], [float("nan"), 0.5, 0.5, 0.2]])
    kept = deterministic_gates(log_alpha, 2, scores) != 0
    assert kept[0].nonzero().flatten().tolist() == [1, 3]  # score 1 thrice: the two higher logits
    assert kept[1].nonzero().flatten().tolist() == [1, 2]  # a NaN score ranks last, whatever its logit
    assert torch.equal(deterministic_gates(log_alpha, 2) != 0, log_alpha >= log_alpha.topk(2).values[:, -1:])


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


def test_forward_samples_in_training_and_evaluates_the_current_or_the_target_model():
    l0 = L0Module(GQA, _target(HALF_GQA))
    with torch.no_grad():
        for p in l0.log_alpha.values():
            p.copy_(torch.randn(p.shape) * 4)
    sampled = l0.train()()
    assert {n: m.shape for n, m in sampled.items()} == {s.name: torch.Size(s.shape) for s in l0.specs}
    assert all(m.requires_grad for m in sampled.values())
    current = l0.eval()()  # the run's default eval_masks: the noise-free gates
    for spec in l0.specs:
        torch.testing.assert_close(current[spec.name], expected_gates(l0.gate_logits(spec.name)))
    l0.use_eval_masks("target")
    first, second = l0(), l0()
    for spec in l0.specs:
        assert torch.equal(first[spec.name], second[spec.name])
        assert ((first[spec.name] != 0).sum(-1) == spec.keep).all()
    with pytest.raises(ValueError, match="eval masks 'cut'"):
        l0.use_eval_masks("cut")


def test_expected_gates_is_the_clamped_stretched_sigmoid():
    log_alpha = torch.tensor([-10.0, -2.5, 0.0, 1.0, 2.5, 10.0])
    low, high = LIMITS
    formula = (torch.sigmoid(log_alpha) * (high - low) + low).clamp(0, 1)
    torch.testing.assert_close(expected_gates(log_alpha), formula)
    assert expected_gates(log_alpha)[0] == 0 and expected_gates(log_alpha)[-1] == 1
    assert expected_gates(torch.tensor(0.0)) == pytest.approx(0.5)


def test_target_sparsity_ramps_linearly_and_set_step_clamps():
    l0 = L0Module(GQA, _target(HALF_GQA), lagrangian_warmup=100, log_alpha_limit=3.0)
    final = {s.name: s.final_sparsity for s in l0.specs}
    for step, fraction in [(0, 0.0), (25, 0.25), (100, 1.0), (250, 1.0)]:
        l0.set_step(step)
        assert l0.target_sparsity() == pytest.approx({n: f * fraction for n, f in final.items()})
    assert all(p.max() == 3.0 for p in l0.log_alpha.values())  # initialised at 4.6, clamped to the limit


def _randomise(l0: L0Module, seed: int) -> None:
    """Gate logits and multipliers drawn from a standard normal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in l0.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))


def test_lagrangian_loss_is_the_per_row_formula_and_parameters_are_named_for_the_optimizer():
    l0 = L0Module(GQA, _target(HALF_GQA), lagrangian_warmup=10, constraint="row")
    l0.set_step(5)
    names = dict(l0.named_parameters())
    assert set(names) == {f"log_alpha.{s.name}" for s in l0.specs} | {
        f"lagrangian.lambda{i}.{s.name}" for s in l0.specs for i in (1, 2)}
    rows = {"layer": (1,), "kv_group": (4,), "intermediate": (4,), "hidden": (1,)}  # no head: groups of 4 kept
    assert {n: tuple(p.shape) for n, p in l0.lagrangian.lambda1.items()} == rows
    heads = L0Module(GQA, _target(HALF_GQA | {"n_heads": 2}), constraint="row")
    assert tuple(heads.lagrangian.lambda1["head"].shape) == (4, 2)  # one pair per (layer, KV group)
    _randomise(l0, seed=1)
    formula = 0.0
    for spec in l0.specs:
        p = prob_nonzero(l0.log_alpha[spec.name])
        gap = (1 - p.mean(-1)).reshape(rows[spec.name]) - 0.5 * spec.final_sparsity  # half-way up the ramp
        formula = formula + (l0.lagrangian.lambda1[spec.name] * gap + l0.lagrangian.lambda2[spec.name] * gap ** 2).sum()
    assert l0.lagrangian_loss().dim() == 0  # added to the scalar LM loss
    torch.testing.assert_close(l0.lagrangian_loss(), formula.float())


def test_overall_constraint_is_one_pair_per_structure_on_its_mean_sparsity():
    l0 = L0Module(GQA, _target(HALF_GQA), constraint="overall")
    assert all(p.shape == (1,) for n, p in l0.named_parameters() if n.startswith("lagrangian."))
    with torch.no_grad():
        # intermediate: two layers fully open, two fully shut: overall sparsity 0.5 = the target, rows far off
        l0.log_alpha["intermediate"].copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]).unsqueeze(1).expand(4, 192))
    assert l0.sparsity_gaps()["intermediate"].abs().item() < 1e-3
    row = L0Module(GQA, _target(HALF_GQA), constraint="row")
    row.load_state_dict({**row.state_dict(), "log_alpha.intermediate": l0.log_alpha["intermediate"].detach()})
    assert (row.sparsity_gaps()["intermediate"].abs() > 0.49).all()  # every row misses its target by half
    with pytest.raises(ValueError, match="constraint 'rows'"):
        L0Module(GQA, _target(HALF_GQA), constraint="rows")


def test_paper_constraint_is_one_pair_per_structure_over_the_mean_of_its_row_gaps():
    l0 = L0Module(GQA, _target(HALF_GQA), lagrangian_warmup=10, constraint="paper")
    l0.set_step(10)
    assert all(p.shape == (1,) for n, p in l0.named_parameters() if n.startswith("lagrangian."))
    _randomise(l0, seed=2)
    formula = 0.0
    for spec in l0.specs:
        gap = 1 - prob_nonzero(l0.log_alpha[spec.name]).mean(-1) - spec.final_sparsity  # one per row
        lam1, lam2 = l0.lagrangian.lambda1[spec.name], l0.lagrangian.lambda2[spec.name]
        formula = formula + (lam1 * gap + lam2 * gap ** 2).mean()
    torch.testing.assert_close(l0.lagrangian_loss(), formula.float())
    assert l0.sparsity_gaps()["intermediate"].shape == (4,)  # rows, unlike overall's single mean


def _optimizer(l0: L0Module, lr: float = 0.1) -> torch.optim.Optimizer:
    # maximize=True plays the role of the negative learning rate the training recipe gives the multipliers.
    return torch.optim.Adam([{"params": list(l0.log_alpha.parameters()), "lr": lr},
                             {"params": list(l0.lagrangian.parameters()), "lr": lr, "maximize": True}])


def test_lambda_grows_while_the_expected_sparsity_lags_its_target():
    l0 = L0Module(GQA, _target(HALF_GQA), constraint="overall")
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
    l0 = L0Module(GQA, _target(HALF_GQA | {"n_heads": 2}), lagrangian_warmup=100, constraint="row")
    optimizer = _optimizer(l0)
    for step in range(300):
        l0.set_step(step)
        # Stand-in for the LM loss, which prefers open gates: the constraint has to win against it.
        task = -0.01 * sum(p.mean() for p in l0.probabilities().values())
        optimizer.zero_grad()
        (task + l0.lagrangian_loss()).backward()
        optimizer.step()
    target = l0.target_sparsity()
    for spec in l0.specs:
        assert target[spec.name] == spec.final_sparsity
        # every row on its own, not just the structure's mean
        row_sparsity = 1 - l0.probabilities()[spec.name].mean(-1)
        assert (row_sparsity - spec.final_sparsity).abs().max().item() < 0.01, spec.name


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


def test_hardening_freezes_exact_binary_masks_for_training_evaluation_and_the_cut():
    l0 = L0Module(GQA, _target(HALF_GQA), lagrangian_warmup=4, harden_batch=8)
    with torch.no_grad():
        for p in l0.log_alpha.values():
            p.copy_(torch.randn(p.shape) * 3)
    for step in range(8):
        l0.set_step(step)
        assert not l0.harden_due()
    l0.set_step(8)
    assert l0.harden_due()
    before = {n: (m != 0).float() for n, m in l0.deterministic_masks().items()}
    l0.harden()
    assert l0.is_hardened() and not l0.harden_due()
    with torch.no_grad():
        for p in l0.log_alpha.values():
            p.neg_()  # the gates keep learning under the constraint; the frozen masks must not follow
    for masks in (l0.train()(), l0.eval()(), l0.deterministic_masks()):
        for spec in l0.specs:
            assert torch.equal(masks[spec.name], before[spec.name]), spec.name
            assert ((masks[spec.name] == 0) | (masks[spec.name] == 1)).all()
            assert ((masks[spec.name] != 0).sum(-1) == spec.keep).all()
    # every gate logit still gets a (zero) gradient: DDP waits for one from every parameter
    (sum(m.sum() for m in l0.train()().values()) + l0.lagrangian_loss()).backward()
    assert all(p.grad is not None for p in l0.log_alpha.values())
    rebuilt = l0_from_state_dict(l0.state_dict())
    assert rebuilt.is_hardened() and rebuilt.options["harden_batch"] == 8
    assert all(torch.equal(rebuilt.deterministic_masks()[n], before[n]) for n in before)


def _run_schedule(l0: L0Module, logits_at: dict[int, list[float]], batches: int, start: int = 0) -> None:
    """What the pruning callback does at every batch start, with the layer logits set from ``logits_at``."""
    for batch in range(start, batches):
        with torch.no_grad():
            l0.log_alpha["layer"].copy_(torch.tensor(logits_at.get(batch, l0.log_alpha["layer"].tolist())))
        l0.set_step(batch)
        l0.update_shifts()
        if l0.harden_due():
            l0.harden()
        l0.record_usage()


@pytest.mark.parametrize(("harden_by", "kept"), [("usage", [0, 1]), ("logits", [2, 3])])
def test_hardening_keeps_the_units_used_since_the_ramp_or_the_last_logits(harden_by, kept):
    # Layers 0 and 1 lead from the ramp's end (batch 2) on; a last-moment swap puts 2 and 3 ahead at batch 5.
    l0 = L0Module(GQA, _target({"n_layers": 2}, GQA), ["layer"], lagrangian_warmup=2, harden_batch=6,
                  harden_by=harden_by)
    _run_schedule(l0, {0: [3.0, 2.0, 1.0, 0.0], 5: [0.0, 0.1, 0.3, 0.2]}, batches=8)
    assert l0.is_hardened()
    assert l0.hard_masks()["layer"].nonzero().flatten().tolist() == kept
    assert l0.usage_batches.item() == 4  # batches 2-5: from the ramp's end until the masks froze
    p_ahead = prob_nonzero(l0.gate_logits("layer")).detach()  # the logits now, unchanged since batch 5
    assert l0.usage_layer[2].item() < 3 + p_ahead[2].item()  # three batches near 0, one ahead


def test_layer_candidates_fill_the_undecided_places_in_every_way_the_frozen_cut_first():
    source = LlamaConfig(**{**GQA.to_dict(), "n_layers": 6})
    l0 = L0Module(source, _target({"n_layers": 3}, source), ["layer"], constraint="row", harden_by="logits")
    assert l0.layer_candidates(8) == []  # not frozen yet: nothing to choose
    with torch.no_grad():  # P(z != 0): layer 0 decided open, 5 decided shut, 1-4 undecided (1 ahead, then 3, 2, 4)
        l0.log_alpha["layer"].copy_(torch.tensor([8.0, 0.9, 0.5, 0.7, 0.3, -8.0]))
    l0.harden()
    kept = [mask.nonzero().flatten().tolist() for mask in l0.layer_candidates(8)]
    assert kept == [[0, 1, 3], [0, 1, 2], [0, 1, 4], [0, 2, 3], [0, 3, 4], [0, 2, 4]]  # two places for four layers
    assert [m.nonzero().flatten().tolist() for m in l0.layer_candidates(3)] == kept[:3]
    l0.freeze_layers(l0.layer_candidates(8)[4])
    assert l0.hard_masks()["layer"].nonzero().flatten().tolist() == [0, 3, 4]
    with torch.no_grad():  # every gate decided: the frozen cut is the only one
        l0.log_alpha["layer"].copy_(torch.tensor([8.0, 8.0, 8.0, -8.0, -8.0, -8.0]))
    l0.harden()
    assert [m.nonzero().flatten().tolist() for m in l0.layer_candidates(8)] == [[0, 1, 2]]
    without = L0Module(source, _target({"d_model": 48}, source), ["hidden"], harden_batch=0)
    without.harden()
    assert without.layer_candidates(8) == []  # no layer gates


def test_a_state_without_usage_loads_and_hardens_by_the_logits():
    l0 = L0Module(GQA, _target({"n_layers": 2}, GQA), ["layer"], lagrangian_warmup=2, harden_batch=6)
    _run_schedule(l0, {0: [3.0, 2.0, 1.0, 0.0], 5: [0.0, 0.1, 0.3, 0.2]}, batches=6)
    old = {k: v for k, v in l0.state_dict().items() if not k.startswith("usage_")}  # a checkpoint of an earlier release
    resumed = l0_from_state_dict(old)
    assert resumed.usage_batches.item() == 0 and not resumed.usage_layer.any()
    _run_schedule(resumed, {}, batches=7, start=6)
    assert resumed.is_hardened() and resumed.usage_batches.item() == 0
    assert resumed.hard_masks()["layer"].nonzero().flatten().tolist() == [2, 3]
    with pytest.raises(ValueError, match="harden_by 'last'"):
        L0Module(GQA, _target({"n_layers": 2}, GQA), ["layer"], harden_by="last")


def test_cut_report_counts_expected_size_and_decided_gates():
    l0 = L0Module(GQA, _target({"n_layers": 2}, GQA), ["layer"], constraint="row")
    with torch.no_grad():  # P(z != 0): ~1, ~0.9, ~0.01, ~0.01 -> two kept, one of them decided
        l0.log_alpha["layer"].copy_(torch.tensor([8.0, 0.6, -6.2, -6.2]))
    report = l0.cut_report()["layer"]
    p = prob_nonzero(l0.log_alpha["layer"]).detach()
    assert report["expected_keep"] == pytest.approx(p.sum().item())
    assert report["target_keep"] == 2
    assert report["size_error"] == pytest.approx(abs(p.sum().item() - 2) / 2)
    assert report["decided"] == pytest.approx(0.5)
    assert report["undecided"] == pytest.approx(0.25)


def test_exact_constraint_meets_the_scheduled_count_of_every_row_without_multipliers():
    l0 = L0Module(GQA, _target(HALF_GQA | {"n_heads": 2}), lagrangian_warmup=10, harden_batch=20,
                  temperature=0.2, final_temperature=0.05)
    assert list(l0.lagrangian.parameters()) == [] and l0.lagrangian_loss().item() == 0.0
    with torch.no_grad():
        for p in l0.log_alpha.values():
            p.copy_(torch.randn(p.shape) * 3)
    for step, tau in [(0, 0.2), (4, 0.2), (10, 0.2), (15, 0.125), (20, 0.05), (30, 0.05)]:
        l0.set_step(step)
        l0.update_shifts()
        assert l0.temperature() == pytest.approx(tau)
        for spec in l0.specs:
            wanted = spec.units - (spec.units - spec.keep) * min(1.0, step / 10)
            counts = l0.probabilities()[spec.name].sum(-1)
            torch.testing.assert_close(counts, torch.full_like(counts, wanted), atol=1e-3 * spec.units, rtol=0)
    # a low final temperature decides the gates: the target count sits on the kept units
    report = l0.cut_report()
    assert all(r["size_error"] < 1e-3 and r["decided"] > 0.5 for r in report.values()), report
    # the logits still learn (which units to keep): the samples carry the LM loss's gradient to those near
    # the row's threshold (here all of them: the constant init, half-way up the ramp)
    fresh = L0Module(GQA, _target(HALF_GQA), lagrangian_warmup=10).train()
    fresh.set_step(5)
    fresh.update_shifts()
    sum(m.sum() for m in fresh().values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fresh.log_alpha.values())
    with pytest.raises(ValueError, match="final_temperature"):
        L0Module(GQA, _target(HALF_GQA), temperature=0.1, final_temperature=0.2)


def test_the_layer_row_cools_to_its_own_final_temperature_and_decides_where_the_others_do_not():
    def near_threshold(l0: L0Module) -> None:  # every row: logits 0.02 apart around the kept count's boundary
        with torch.no_grad():
            for p in l0.log_alpha.values():
                p.copy_(torch.linspace(0.0, 0.02 * (p.shape[-1] - 1), p.shape[-1]).expand(p.shape))

    kwargs = {"lagrangian_warmup": 10, "harden_batch": 20, "temperature": 0.1, "final_temperature": 0.05}
    plain, cooler = L0Module(GQA, _target(HALF_GQA), **kwargs), L0Module(GQA, _target(HALF_GQA), **kwargs,
                                                                          layer_final_temperature=0.002)
    for l0 in (plain, cooler):
        near_threshold(l0)
        l0.set_step(15)
        assert l0.temperature("layer") == pytest.approx(0.075 if l0 is plain else 0.1 + (0.002 - 0.1) / 2)
        assert l0.temperature("hidden") == pytest.approx(0.075)
        l0.set_step(20)
        l0.update_shifts()
        counts = l0.probabilities()["layer"].sum(-1)  # the shift meets the count at either temperature
        torch.testing.assert_close(counts, torch.full_like(counts, 2.0), atol=1e-3, rtol=0)
    assert plain.temperature("layer") == pytest.approx(0.05) and cooler.temperature("layer") == pytest.approx(0.002)
    reports = [l0.cut_report() for l0 in (plain, cooler)]
    assert reports[0]["layer"]["decided"] < 0.95 <= reports[1]["layer"]["decided"]
    assert reports[0]["hidden"] == reports[1]["hidden"]  # the other structures are untouched
    with pytest.raises(ValueError, match="layer_final_temperature"):
        L0Module(GQA, _target(HALF_GQA), temperature=0.1, layer_final_temperature=0.2)
