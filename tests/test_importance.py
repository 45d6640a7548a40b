"""Activation importance: score shapes, planted dead units score lowest, logits and one-shot masks hit the target."""

from __future__ import annotations

import logging

import pytest
import torch
from recipe_fixtures import DOMAINS, tiny_recipe, write_mds

from llmshear.builders import build_l0, build_trainer, run_calibration_batches
from llmshear.config import ConfigError, load
from llmshear.models.build import build_model
from llmshear.models.cut import cut_model
from llmshear.models.hf import load_config
from llmshear.models.importance import (
    activation_importance,
    importance_log_alpha,
    importance_masks,
    random_masks,
)
from llmshear.models.l0 import TargetShape, deterministic_gates, mask_specs

# tiny-gqa: d_model 96, 4 layers, 8 heads in 2 KV groups of 4, intermediate 192. Every structure is pruned.
TARGET = TargetShape(d_model=64, n_layers=3, n_heads=2, n_kv_heads=1, intermediate_size=96)
SHAPES = {"layer": (4,), "kv_group": (4, 2), "head": (4, 2, 4), "intermediate": (4, 192), "hidden": (96,)}


def tiny_model():
    return build_model(load_config("tiny-gqa"), seed=0)


def calibration(n: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 24), generator=generator) for _ in range(n)]


@torch.no_grad()
def plant_dead_units(model) -> None:
    """Layer 0: KV group 1's heads write nothing; layer 1: head (0, 2); layer 2: channel 7; layer 3: whole
    layer; hidden dim 11 is zeroed by every norm."""
    layers, hd = model.model.layers, model.cfg.head_dim
    layers[0].self_attn.o_proj.weight[:, 4 * hd:8 * hd] = 0
    layers[1].self_attn.o_proj.weight[:, 2 * hd:3 * hd] = 0
    layers[2].mlp.down_proj.weight[:, 7] = 0
    layers[3].self_attn.o_proj.weight.zero_()
    layers[3].mlp.down_proj.weight.zero_()
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param[11] = 0


def test_scores_have_the_mask_shapes_and_leave_the_model_unchanged():
    model = tiny_model().train()
    ids = calibration(1)[0]
    before = model(ids)
    scores = activation_importance(model, calibration())
    assert {name: tuple(s.shape) for name, s in scores.items()} == SHAPES
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores.values())
    torch.testing.assert_close(scores["kv_group"], scores["head"].sum(-1))
    assert model.training and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)


def test_planted_dead_units_get_the_lowest_scores():
    model = tiny_model()
    plant_dead_units(model)
    scores = activation_importance(model, calibration())
    assert scores["kv_group"][0].argmin() == 1
    assert scores["head"][1].flatten().argmin() == 2
    assert scores["intermediate"][2].argmin() == 7
    assert scores["layer"].argmin() == 3 and scores["layer"][3] < 1e-5
    assert scores["hidden"].argmin() == 11 and scores["hidden"][11] == 0


def test_logits_rank_the_top_keep_first_around_the_constant_init():
    specs = mask_specs(load_config("tiny-gqa"), TARGET)
    generator = torch.Generator().manual_seed(2)
    scores = {s.name: torch.rand(s.shape, generator=generator) for s in specs}
    logits = importance_log_alpha(scores, specs, init=5.0, spread=2.0)
    for spec in specs:
        value, score = logits[spec.name], scores[spec.name]
        top = value.topk(spec.keep, dim=-1)
        assert torch.equal(top.indices.sort(-1).values, score.topk(spec.keep, dim=-1).indices.sort(-1).values)
        rest = value.scatter(-1, top.indices, float("inf"))
        assert (top.values.min(-1).values > 5.0).all() and (rest.min(-1).values < 5.0).all()
        assert value.min() >= 3.0 and value.max() <= 7.0 and abs(value.mean() - 5.0) <= 1.0
        kept = (deterministic_gates(value, spec.keep) != 0).sum(-1)
        assert (kept == spec.keep).all(), spec.name


def test_importance_masks_cut_to_the_target_and_drop_the_dead_units():
    model = tiny_model()
    plant_dead_units(model)
    masks = importance_masks(model, TARGET, calibration())
    assert set(masks) == set(SHAPES)
    assert all(set(m.unique().tolist()) == {0.0, 1.0} for m in masks.values())
    assert masks["layer"][3] == 0 and masks["kv_group"][0, 1] == 0 and masks["hidden"][11] == 0
    assert masks["head"][1, 0, 2] == 0 and masks["intermediate"][2, 7] == 0
    cut = cut_model(model, masks)
    assert cut.cfg == TARGET.to_config(model.cfg)


def test_random_masks_have_the_target_shape_and_depend_on_the_seed():
    cfg = load_config("tiny-gqa")
    first, again, other = (random_masks(cfg, TARGET, torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    for spec in mask_specs(cfg, TARGET):
        assert first[spec.name].shape == spec.shape and (first[spec.name].sum(-1) == spec.keep).all()
    assert cut_model(build_model(cfg, device="meta"), first).cfg == TARGET.to_config(cfg)


@pytest.fixture
def data(tmp_path):
    return write_mds(tmp_path / "data", DOMAINS, 32, n_train=4, n_eval=2)


@pytest.mark.parametrize(("overrides", "message"), [
    (["pruning.init=magic"], "pruning.init: 'magic' is not one of ['constant', 'importance']"),
    (["pruning.init_batches=0"], "pruning.init_batches=0 must be positive"),
    (["pruning.init=importance", "model.init_device=meta", "fsdp.enabled=true"],
     "pruning.init='importance' needs model.init_device='cpu'"),
])
def test_bad_init_names_its_key(tmp_path, data, overrides, message):
    with pytest.raises(ConfigError) as caught:
        load(tiny_recipe(tmp_path, data), overrides, cuda=False)
    assert any(message in p for p in caught.value.problems), caught.value.problems


def test_importance_init_through_the_builder_and_resume_keeps_the_checkpoint(tmp_path, data, caplog):
    recipe = tiny_recipe(tmp_path, data, train={"max_batches": 2, "eval_interval": 2},
                         checkpoint={"save_interval": 2})
    cfg = load(recipe, ["pruning.init=importance", "pruning.init_batches=2"], cuda=False)
    trainer = build_trainer(cfg, world_size=1)
    l0 = trainer.state.model.l0
    # Before fit, the trainer's model is still the source model.
    expected = importance_log_alpha(activation_importance(trainer.state.model.model, run_calibration_batches(cfg)),
                                    l0.specs, init=cfg.pruning.init_log_alpha)
    for spec in l0.specs:
        assert l0.log_alpha[spec.name].unique().numel() > 1, spec.name
        torch.testing.assert_close(l0.log_alpha[spec.name].detach(), expected[spec.name])
    trainer.fit()
    trained = {k: v.detach().clone() for k, v in l0.log_alpha.items()}
    trainer.close()

    caplog.set_level(logging.INFO)
    resumed = build_trainer(load(recipe, ["pruning.init=importance", "checkpoint.autoresume=true",
                                          "train.max_batches=4"], cuda=False), world_size=1)
    assert "the checkpoint's gate logits are kept" in caplog.text
    for name, value in resumed.state.model.l0.log_alpha.items():
        assert torch.equal(value.detach(), trained[name]), name
    resumed.close()


def test_constant_init_noise_comes_from_the_seed_not_from_the_process(tmp_path, data):
    cfg = load(tiny_recipe(tmp_path, data), ["pruning.init=constant"])
    source = load_config(cfg.model.pretrained)
    first = build_l0(cfg, source).log_alpha
    torch.rand(1000)  # whatever the process drew before
    state = torch.get_rng_state()
    again = build_l0(cfg, source).log_alpha
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    assert all(torch.equal(first[name], again[name]) for name in first)
    other = build_l0(load(tiny_recipe(tmp_path, data), ["pruning.init=constant", "seed=18"]), source).log_alpha
    assert not all(torch.equal(first[name], other[name]) for name in first)
