"""Three parameter groups, gradient ascent on the Lagrange multipliers, per-group schedules."""

import pytest
import torch

from llmshear.models.composer_llama import ComposerLlama
from llmshear.models.hf import build_model, load_config
from llmshear.models.l0 import L0Module, TargetShape
from llmshear.optim import build_optimizer, build_scheduler, parameter_groups


def pruning_model() -> ComposerLlama:
    source = load_config("tiny-gqa")
    target = TargetShape.from_dict({"d_model": 64, "n_layers": 3, "n_heads": 4, "intermediate_size": 96}, source)
    return ComposerLlama(build_model(source, seed=0), l0=L0Module(source, target, constraint="row"))


def test_groups_split_weights_gates_and_multipliers():
    model = pruning_model()
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-4, lag_lr=0.5, weight_decay=0.1)}
    assert set(groups) == {"weights", "gates", "lagrangian"}
    assert (groups["weights"]["lr"], groups["gates"]["lr"], groups["lagrangian"]["lr"]) == (1e-4, 0.5, -0.5)
    assert (groups["gates"]["weight_decay"], groups["lagrangian"]["weight_decay"]) == (0.0, 0.0)
    assert groups["weights"]["weight_decay"] == 0.1
    named = dict(model.named_parameters())
    ids = {name: {id(p) for p in group["params"]} for name, group in groups.items()}
    assert ids["gates"] == {id(p) for n, p in named.items() if n.startswith("l0.log_alpha.")}
    assert ids["lagrangian"] == {id(p) for n, p in named.items() if n.startswith("l0.lagrangian.")}
    assert ids["weights"] == {id(p) for n, p in named.items() if not n.startswith("l0.")}
    assert sum(len(g["params"]) for g in groups.values()) == len(named)


def test_without_pruning_there_is_one_group():
    model = ComposerLlama(build_model(load_config("tiny-llama2"), seed=0))
    assert [g["name"] for g in parameter_groups(model, 1e-4, 1.0, 0.0)] == ["weights"]


def test_multipliers_ascend_while_gates_and_weights_descend():
    model = pruning_model()
    optimizer = build_optimizer(model, lr=1e-3, lag_lr=0.1)
    l0 = model.l0
    l0.set_step(10)  # no warm-up: the target is the final sparsity, far above the current ~0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparsity_before = {n: s.item() for n, s in l0.expected_sparsity().items()}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "domain": torch.zeros(2, dtype=torch.long)}
    for _ in range(20):
        optimizer.zero_grad()
        model.loss(model(batch), batch)["total"].backward()
        optimizer.step()
    for name in l0.lagrangian.lambda1:
        # ∂L/∂λ1 = ŝ - t < 0: ascent drives λ1 negative, which rewards raising the expected sparsity.
        # (one multiplier per row: every row's)
        assert (l0.lagrangian.lambda1[name] < before[f"l0.lagrangian.lambda1.{name}"]).all()
    # Once λ1 < 0, descent on the gates raises the expected sparsity towards the target.
    assert all(s.item() > sparsity_before[n] for n, s in l0.expected_sparsity().items())
    assert not torch.equal(model.model.lm_head.weight, before["model.lm_head.weight"])


def test_rejects_unknown_l0_parameter():
    model = pruning_model()
    model.l0.extra = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="l0.extra"):
        parameter_groups(model, 1e-4, 1.0, 0.0)


@pytest.mark.parametrize("gate_schedule", ["constant", "shared"])
def test_schedule_warms_up_then_decays_the_weights_and_keeps_the_sign(gate_schedule):
    model = pruning_model()
    optimizer = build_optimizer(model, lr=1.0, lag_lr=2.0)
    scheduler = build_scheduler(optimizer, warmup_batches=10, alpha_f=0.1, max_batches=100,
                                gate_schedule=gate_schedule)
    curve = {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.1 + 0.9 * 0.5, 100: 0.1}  # Composer's warm-up + cosine
    rates = {}
    for batch in range(101):
        if batch in curve:
            rates[batch] = {g["name"]: g["lr"] for g in optimizer.param_groups}
        optimizer.step()
        scheduler.step()
    for batch, factor in curve.items():
        gate_factor = factor if gate_schedule == "shared" else 1.0
        assert rates[batch]["weights"] == pytest.approx(factor)
        assert rates[batch]["gates"] == pytest.approx(2.0 * gate_factor)
        assert rates[batch]["lagrangian"] == pytest.approx(-2.0 * gate_factor)  # ascent at every step
    with pytest.raises(ValueError, match="gate_schedule 'decay'"):
        build_scheduler(optimizer, 10, 0.1, 100, gate_schedule="decay")
