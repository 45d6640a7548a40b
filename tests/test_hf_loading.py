"""Strict loading (keys named), bad sources, presets and meta-device builds."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmshear.models.build import CONFIG_ONLY, PRESETS, build_model
from llmshear.models.hf import load_config, load_model, save_pretrained
from llmshear.models.weights import CheckpointMismatchError


@pytest.fixture
def saved(tmp_path):
    """An untied tiny model saved as an HF directory, and a function rewriting its safetensors."""
    out = save_pretrained(build_model(PRESETS["tiny-llama2"](), seed=0), tmp_path / "model")

    def rewrite(change):
        state = load_file(out / "model.safetensors")
        change(state)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})

    return out, rewrite


def test_missing_key_is_named(saved):
    out, rewrite = saved
    rewrite(lambda state: state.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: model\.layers\.2\.mlp\.up_proj\.weight"):
        load_model(out)


def test_untied_model_needs_its_lm_head(saved):
    out, rewrite = saved
    rewrite(lambda state: state.pop("lm_head.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: lm_head\.weight"):
        load_model(out)


def test_unexpected_key_is_named(saved):
    out, rewrite = saved
    rewrite(lambda state: state.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: model\.layers\.9\.mlp\.up_proj\.weight"):
        load_model(out)


def test_shape_mismatch_is_named(saved):
    out, rewrite = saved
    rewrite(lambda state: state.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(32, 64\)"):
        load_model(out)


def test_config_that_does_not_fit_the_weights_fails(saved):
    out, _ = saved
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: model\.layers\.3\."):
        load_model(out)


def test_old_rotary_buffers_are_ignored(saved):
    out, rewrite = saved
    rewrite(lambda state: state.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    expected = build_model(PRESETS["tiny-llama2"](), seed=0)
    assert torch.equal(load_model(out).lm_head.weight, expected.lm_head.weight)


def test_tied_checkpoint_may_repeat_lm_head_only_if_equal(tmp_path):
    out = save_pretrained(build_model(PRESETS["tiny-qwen2"](), seed=0), tmp_path / "model")
    state = load_file(out / "model.safetensors")
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, out / "model.safetensors")
    model = load_model(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_file({**state, "lm_head.weight": torch.zeros(256, 64)}, out / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight differs"):
        load_model(out)


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_config(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match=r"config\.json: key 'model_type' is 'gpt2'"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 8}))
    with pytest.raises(ValueError, match="model_type"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        load_model(tmp_path / "missing.gguf")


def test_directory_without_weights_is_named(saved):
    out, _ = saved
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_model(out)


def test_unsupported_architecture_is_named(saved):
    out, _ = saved
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        load_config(out)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_sources(name):
    assert load_config(name) == PRESETS[name]()
    if name in CONFIG_ONLY:
        with pytest.raises(ValueError, match="meta"):
            load_model(name)
    else:
        a, b = load_model(name), load_model(name)
        assert torch.equal(a.lm_head.weight, b.lm_head.weight), "presets are seeded"


def test_init_weights_are_seeded_and_scaled():
    a = build_model(PRESETS["tiny-qwen2"](), seed=3)
    b = build_model(PRESETS["tiny-qwen2"](), seed=3)
    c = build_model(PRESETS["tiny-qwen2"](), seed=4)
    assert torch.equal(a.model.layers[0].self_attn.q_proj.bias, b.model.layers[0].self_attn.q_proj.bias)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.model.layers[1].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(a.model.norm.weight, torch.ones(64))


def test_llama2_7b_builds_on_meta_without_memory():
    tracemalloc.start()
    model = build_model(load_config("llama2-7b"), device="meta")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == 6_738_415_616  # LLaMA2-7B's published parameter count
    assert model.model.layers[31].mlp.gate_proj.weight.shape == (11008, 4096)


def test_smollm2_config_from_gguf_metadata_matches_the_preset(smollm2):
    cfg, preset = dataclasses.replace(smollm2.cfg), PRESETS["smollm2-135m"]()
    assert cfg.rms_norm_eps == pytest.approx(preset.rms_norm_eps)
    cfg.rms_norm_eps = preset.rms_norm_eps  # stored as float32 in the GGUF
    assert cfg == preset
    assert build_model(cfg, device="meta").num_params() == 134_515_008


def test_smollm2_tokenizer_takes_its_special_tokens_from_the_gguf(smollm2):
    from llmshear.sources import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (smollm2.cfg.bos_token_id, smollm2.cfg.eos_token_id)
    assert tokenizer.pad_token_id == 2 and tokenizer.unk_token == "<|endoftext|>"
