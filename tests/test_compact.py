"""Compact masked forwards (``pruning.compact``): only the units whose gate is not exactly 0 are computed, with
the dense masked forward's logits and gradients (weights and gate logits alike), and FLOPs counted as computed."""

import pytest
import torch
import torch.nn.functional as F

from llmshear.callbacks.pruning import PruningCallback
from llmshear.costs import active_forward_flops_per_token, forward_flops_per_token
from llmshear.models.build import PRESETS, build_model
from llmshear.models.composer_llama import ComposerLlama, model_flops
from llmshear.models.l0 import L0Module, TargetShape

MODELS = ("tiny-llama2", "tiny-gqa", "tiny-qwen2", "tiny-smollm2")
T = 16


def _target(cfg) -> TargetShape:
    """Every structure the source allows, about halved."""
    half_kv, half_q = max(1, cfg.n_kv_heads // 2), max(1, cfg.q_per_kv // 2)
    return TargetShape.from_dict({"n_layers": cfg.n_layers // 2, "intermediate_size": cfg.intermediate_size // 2,
                                  "d_model": cfg.d_model // 2, "n_kv_heads": half_kv, "n_heads": half_kv * half_q},
                                 cfg)


def _l0(cfg, seed: int = 0) -> L0Module:
    """Gate logits spread wide, so that samples hold exact zeros, exact ones and values between; layer 1 and
    the first KV head of layer 0 shut."""
    l0 = L0Module(cfg, _target(cfg), constraint="row")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for log_alpha in l0.log_alpha.values():
            log_alpha.copy_(torch.randn(log_alpha.shape, generator=generator) * 3)
        l0.log_alpha["layer"][1] = -30.0
        if "kv_group" in l0.log_alpha:
            l0.log_alpha["kv_group"][0, 0] = -30.0
    return l0


def _setup(name: str, seed: int):
    """A preset's config, its model (weights from seed 1), the spread gates and a batch of tokens from ``seed``."""
    cfg = PRESETS[name]()
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    return cfg, build_model(cfg, seed=1), _l0(cfg), tokens


def _step(model, l0, tokens, compact: bool):
    """Logits and the gradients of every weight and gate logit of one sampled step (the same sample for both
    forms)."""
    model.zero_grad(set_to_none=True)
    l0.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    masks = l0()
    logits = model(tokens, masks, compact=compact)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    grads = {name: p.grad for name, p in [*model.named_parameters(), *l0.log_alpha.named_parameters()]}
    return logits.detach(), grads, {name: mask.detach() for name, mask in masks.items()}


def _expected_active(cfg, masks) -> tuple[int, list[tuple[int, int, int]]]:
    """Residual width and per-layer (query heads, KV heads, channels) with a nonzero gate, counted directly."""
    layer_on = masks["layer"] != 0
    head = masks.get("head", torch.ones(cfg.n_layers, cfg.n_kv_heads, cfg.q_per_kv))
    head = (masks["kv_group"].unsqueeze(-1) * head != 0) & layer_on[:, None, None]
    channels = (masks["intermediate"] != 0) & layer_on[:, None]
    layers = [(int(head[i].sum()), int(head[i].any(-1).sum()), int(channels[i].sum())) for i in range(cfg.n_layers)]
    return int((masks["hidden"] != 0).sum()), layers


@pytest.mark.parametrize("name", MODELS)
def test_compact_step_has_the_dense_logits_and_gradients(name):
    cfg, model, l0, tokens = _setup(name, seed=2)
    model.train()
    dense_logits, dense, masks = _step(model, l0, tokens, compact=False)
    compact_logits, compact, same_masks = _step(model, l0, tokens, compact=True)
    assert all(torch.equal(masks[k], same_masks[k]) for k in masks)
    zeros = {k: int((m == 0).sum()) for k, m in masks.items()}
    assert all(zeros.values()) and any(int(((m > 0) & (m < 1)).sum()) for m in masks.values()), zeros
    assert (compact_logits - dense_logits).abs().max() <= 1e-4
    assert set(compact) == set(dense)
    for key, grad in dense.items():
        assert compact[key] is not None, key  # every weight gets a gradient: the optimizer steps alike
        scale = max(1.0, grad.abs().max().item())
        assert (compact[key] - grad).abs().max() <= 1e-4 * scale, key
    hidden, layers = _expected_active(cfg, masks)
    assert model.active.d_model == hidden and list(model.active.layers) == layers
    assert layers[1] == (0, 0, 0)
    assert active_forward_flops_per_token(cfg, model.active, T) < forward_flops_per_token(cfg, T)


@pytest.mark.parametrize("name", MODELS)
def test_compact_forward_of_the_target_masks_costs_the_cut_model(name):
    cfg, model, l0, tokens = _setup(name, seed=3)
    model.eval()
    masks = l0.deterministic_masks()
    with torch.no_grad():
        compact, dense = model(tokens, masks, compact=True), model(tokens, masks)
    assert (compact - dense).abs().max() <= 1e-4
    target = l0.target.to_config(cfg)
    computed, cut = active_forward_flops_per_token(cfg, model.active, T), forward_flops_per_token(target, T)
    assert cut <= computed <= 1.01 * cut  # the cut model's, and the norms of the layers with no unit left
    ones = {k: torch.ones_like(m) for k, m in masks.items()}
    with torch.no_grad():
        assert (model(tokens, ones, compact=True) - model(tokens)).abs().max() <= 1e-5
    assert active_forward_flops_per_token(cfg, model.active, T) == forward_flops_per_token(cfg, T)


def test_composer_model_counts_the_flops_its_compact_forwards_computed():
    cfg = PRESETS["tiny-gqa"]()
    model = ComposerLlama(build_model(cfg, seed=0), l0=_l0(cfg), compact=True).train()
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (2, T)), "labels": torch.zeros(2, T, dtype=torch.long)}
    model.start_batch()
    model(batch)
    first = 3 * active_forward_flops_per_token(cfg, model.model.active, T) * 2 * T
    model(batch)  # a second micro batch: another sample, added
    second = 3 * active_forward_flops_per_token(cfg, model.model.active, T) * 2 * T
    assert model.flops_per_batch(batch) == round(first + second)
    assert 0 < first < model_flops(cfg, 2, T)
    model.eval()
    model(batch)  # evaluation is not training: not counted
    assert model.flops_per_batch(batch) == round(first + second)
    model.start_batch()
    assert model.flops_per_batch(batch) == 0
    dense = ComposerLlama(build_model(cfg, seed=0), l0=_l0(cfg)).train()
    dense(batch)
    assert dense.flops_per_batch(batch) == model_flops(cfg, 2, T)


def test_the_pruning_callback_starts_every_batch_count_and_logs_it():
    cfg = PRESETS["tiny-gqa"]()
    model = ComposerLlama(build_model(cfg, seed=0), l0=_l0(cfg), compact=True).train()
    model.batch_flops = 123.0

    class State:  # what batch_start / batch_end read
        pass

    state = State()
    state.model, state.batch = model, {"input_ids": torch.zeros(2, T, dtype=torch.long)}
    state.timestamp = type("Stamp", (), {"batch": 0})()
    logged = {}
    logger = type("Logger", (), {"log_metrics": lambda self, metrics: logged.update(metrics)})()
    PruningCallback(None).batch_start(state, logger)
    assert model.batch_flops == 0
    model(state.batch | {"labels": state.batch["input_ids"]})
    PruningCallback(None).batch_end(state, logger)
    assert logged["l0/batch_flops"] == round(model.batch_flops) > 0
