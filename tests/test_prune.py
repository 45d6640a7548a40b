"""Cutting masked models into dense ones (llmshear.models.cut) and the prune script, from a checkpoint or one-shot."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.models import ComposerModel
from recipe_fixtures import DOMAINS, tiny_recipe, write_mds
from script_modules import script
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from llmshear.builders import run_calibration_batches
from llmshear.config import load
from llmshear.models.build import PRESETS, build_model
from llmshear.models.cut import cut_model, plan_cut, prune_summary
from llmshear.models.hf import load_config, load_model, save_pretrained
from llmshear.models.importance import importance_masks
from llmshear.models.l0 import L0Module, TargetShape, params_of_masks
from llmshear.models.llama import LlamaConfig
from llmshear.tools.export import export_checkpoint, load_pruning_checkpoint

TOL = 1e-4
# MHA untied, GQA untied (llama3 rope), GQA tied with q/k/v bias (Qwen2), GQA tied with groups of 3 (SmolLM2).
MODELS = ("tiny-llama2", "tiny-gqa", "tiny-qwen2", "tiny-smollm2")


def _target_for(cfg, structure: str) -> dict:
    """A target that needs exactly ``structure`` (``all``: every structure the source allows)."""
    half_kv, half_q = max(1, cfg.n_kv_heads // 2), max(1, cfg.q_per_kv // 2)
    single = {
        "layer": {"n_layers": cfg.n_layers // 2},
        "kv_group": {"n_kv_heads": half_kv, "n_heads": half_kv * cfg.q_per_kv},
        "head": {"n_kv_heads": cfg.n_kv_heads, "n_heads": cfg.n_kv_heads * half_q},
        "intermediate": {"intermediate_size": cfg.intermediate_size // 2},
        "hidden": {"d_model": cfg.d_model // 2},
    }
    if structure == "all":
        return single["layer"] | single["intermediate"] | single["hidden"] | {
            "n_kv_heads": half_kv, "n_heads": half_kv * half_q}
    return single[structure]


def _random_masks(cfg, target: TargetShape, seed: int = 0) -> dict[str, torch.Tensor]:
    l0 = L0Module(cfg, target, constraint="row")  # raw logits: the kept values are P(gate != 0), not 1
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for log_alpha in l0.log_alpha.values():
            log_alpha.copy_(torch.randn(log_alpha.shape, generator=generator) * 2)
    return l0.deterministic_masks()


def _tokens(cfg, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS)
def test_all_ones_gates_equal_no_gates(name):
    cfg = PRESETS[name]()
    model = build_model(cfg, seed=0)
    ones = {"layer": torch.ones(cfg.n_layers), "kv_group": torch.ones(cfg.n_layers, cfg.n_kv_heads),
            "head": torch.ones(cfg.n_layers, cfg.n_kv_heads, cfg.q_per_kv),
            "intermediate": torch.ones(cfg.n_layers, cfg.intermediate_size), "hidden": torch.ones(cfg.d_model)}
    tokens = _tokens(cfg)
    with torch.no_grad():
        assert (model(tokens, ones) - model(tokens)).abs().max() <= 1e-5


@pytest.mark.parametrize("structure", ["layer", "kv_group", "head", "intermediate", "hidden", "all"])
@pytest.mark.parametrize("name", MODELS)
def test_masked_equals_cut_equals_hf_reload(name, structure, tmp_path):
    cfg = PRESETS[name]()
    if structure == "head" and cfg.q_per_kv == 1:
        pytest.skip("an MHA source has one query head per KV group: nothing to prune within groups")
    target = TargetShape.from_dict(_target_for(cfg, structure), cfg)
    model = build_model(cfg, seed=1)
    masks = _random_masks(cfg, target)
    everything = {"layer", "kv_group", "intermediate", "hidden"} | ({"head"} if cfg.q_per_kv > 1 else set())
    assert set(masks) == (everything if structure == "all" else {structure})
    tokens = _tokens(cfg)
    with torch.no_grad():
        masked = model(tokens, masks)
        cut = cut_model(model, masks)
        cut_logits = cut(tokens)
        save_pretrained(cut, tmp_path / "cut")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "cut", dtype=torch.float32).eval()
        reloaded = hf(tokens).logits
    assert cut.cfg == target.to_config(cfg)
    assert (masked - cut_logits).abs().max() <= TOL
    assert (reloaded - cut_logits).abs().max() <= TOL
    indicators = {k: (v != 0).float() for k, v in masks.items()}
    assert params_of_masks(cfg, indicators).item() == cut.num_params() == hf.num_parameters()
    assert (cut.lm_head.weight is cut.model.embed_tokens.weight) == cfg.tie_word_embeddings


def test_bf16_masked_equals_cut_when_more_than_256_hidden_dims_are_kept():
    # The RMSNorm divides by the number of kept dimensions; in bf16 that count (577) would round to 576.
    cfg = LlamaConfig(vocab_size=64, d_model=600, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8,
                      intermediate_size=16)
    model = build_model(cfg, seed=0, dtype=torch.bfloat16)
    hidden = torch.ones(cfg.d_model)
    hidden[:23] = 0
    tokens = _tokens(cfg)
    with torch.no_grad():
        diff = (model(tokens, {"hidden": hidden}).float() - cut_model(model, {"hidden": hidden})(tokens).float())
    assert diff.abs().max() <= 1e-3


def _sheared_params(d: int, layers: int, heads: int, intermediate: int, vocab: int = 32000, hd: int = 128) -> int:
    """Parameters of an untied MHA LLaMA: embeddings + lm_head, per layer q/k/v/o + SwiGLU + two norms, final norm."""
    return 2 * vocab * d + layers * (4 * d * heads * hd + 3 * d * intermediate + 2 * d) + d


@pytest.mark.parametrize(
    ("target", "params"),
    [
        (TargetShape(2048, 24, 16, 16, 5504), _sheared_params(2048, 24, 16, 5504)),  # Sheared-LLaMA-1.3B
        (TargetShape(2560, 32, 20, 20, 6912), _sheared_params(2560, 32, 20, 6912)),  # Sheared-LLaMA-2.7B
    ],
)
def test_llama2_7b_cuts_to_the_sheared_llama_shapes_on_meta(target, params):
    cfg = load_config("llama2-7b")
    model = build_model(cfg, device="meta")
    masks = _random_masks(cfg, TargetShape.from_dict({"n_kv_heads": target.n_heads} | vars(target), cfg))
    cut = cut_model(model, masks)
    assert cut.lm_head.weight.is_meta
    assert cut.cfg == target.to_config(cfg)
    assert cut.num_params() == params == params_of_masks(cfg, {k: (v != 0).float() for k, v in masks.items()})
    assert model.num_params() == _sheared_params(4096, 32, 32, 11008)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M with its real weights (GGUF, ~15 s), loaded once for this module."""
    return load_model("smollm2")


def test_smollm2_cuts_to_the_demo_target_with_real_weights(smollm2):
    cfg = smollm2.cfg
    target = TargetShape(d_model=384, n_layers=20, n_heads=6, n_kv_heads=2, intermediate_size=1024)
    masks = _random_masks(cfg, TargetShape.from_dict(vars(target), cfg))
    tokens = _tokens(cfg)
    with torch.no_grad():
        masked = smollm2(tokens, masks)
        cut = cut_model(smollm2, masks)
        cut_logits = cut(tokens)
    assert cut.cfg == target.to_config(cfg)
    assert cut.num_params() == params_of_masks(cfg, {k: (v != 0).float() for k, v in masks.items()})
    # A randomly pruned real model amplifies fp32 rounding to ~1e-3 absolute (masked fp32 vs fp64 differs as
    # much), so the bound is relative to the logit scale; a real mismatch would be of order one.
    assert (masked - cut_logits).abs().max() <= 1e-4 * masked.abs().max()


def test_plan_cut_rejects_masks_that_are_not_a_valid_gqa_model():
    cfg = PRESETS["tiny-gqa"]()
    head = torch.ones(cfg.n_layers, cfg.n_kv_heads, cfg.q_per_kv)
    head[1, 0, 0] = 0  # group 0 of layer 1 keeps 3 query heads, group 1 keeps 4
    with pytest.raises(ValueError, match="layer 1: KV groups keep"):
        plan_cut(cfg, {"head": head})
    channels = torch.ones(cfg.n_layers, cfg.intermediate_size)
    channels[2, :5] = 0
    with pytest.raises(ValueError, match="different or zero numbers of channels"):
        plan_cut(cfg, {"intermediate": channels})
    with pytest.raises(ValueError, match="mask 'hidden' has shape"):
        plan_cut(cfg, {"hidden": torch.ones(3)})


def test_prune_summary_counts_and_kept_units():
    cfg = PRESETS["tiny-gqa"]()
    model = build_model(cfg, seed=0)
    target = TargetShape.from_dict(_target_for(cfg, "all"), cfg)
    masks = _random_masks(cfg, target)
    summary = prune_summary(model, masks)
    assert summary["params_before"] == model.num_params()
    assert summary["params_after"] == cut_model(model, masks).num_params()
    assert summary["kept_layers"] == masks["layer"].nonzero().flatten().tolist()
    for layer in summary["layers"]:
        i = layer["source_layer"]
        assert layer["kv_groups"] == masks["kv_group"][i].nonzero().flatten().tolist()
        assert len(layer["heads"]) == target.n_heads and layer["channels"] == target.intermediate_size
        assert all(h // cfg.q_per_kv in layer["kv_groups"] for h in layer["heads"])
    json.dumps(summary)


def _composer_checkpoint(path, name: str = "tiny-qwen2", seed: int = 0):
    """A checkpoint laid out as Composer writes one for ComposerLlama (``.model`` = LlamaLM, ``.l0`` = L0Module)."""
    cfg = PRESETS[name]()
    model = build_model(cfg, seed=seed)
    l0 = L0Module(cfg, TargetShape.from_dict(_target_for(cfg, "all"), cfg), lagrangian_warmup=10)
    with torch.no_grad():
        for log_alpha in l0.log_alpha.values():
            log_alpha.normal_(0, 2, generator=torch.Generator().manual_seed(seed))
    l0.set_step(5)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"l0.{k}": v for k, v in l0.state_dict().items()})
    torch.save({"state": {"model": state, "optimizers": {}, "timestamp": {}}, "rng": []}, path)
    return model, l0


def test_prune_checkpoint_writes_the_cut_model_masks_and_summary(tmp_path):
    model, l0 = _composer_checkpoint(tmp_path / "ep0-ba5-rank0.pt")
    loaded, loaded_l0 = load_pruning_checkpoint(tmp_path / "ep0-ba5-rank0.pt")
    assert loaded.cfg == model.cfg and loaded_l0.step.item() == 5
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    summary = export_checkpoint(tmp_path / "ep0-ba5-rank0.pt", tmp_path / "out")
    masks = l0.deterministic_masks()
    saved_masks = torch.load(tmp_path / "out" / "masks.pt", weights_only=True)
    assert saved_masks.keys() == masks.keys() and all(torch.equal(saved_masks[k], masks[k]) for k in masks)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = _tokens(model.cfg)
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens, masks)).abs().max() <= TOL
    assert hf.config.hidden_size == l0.target.d_model and hf.config.num_key_value_heads == l0.target.n_kv_heads
    assert summary["params_after"] == hf.num_parameters()


def test_prune_checkpoint_refuses_bad_input_and_writes_nothing(tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    _composer_checkpoint(checkpoint)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_checkpoint(checkpoint, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        export_checkpoint(truncated, tmp_path / "new")
    not_ours = tmp_path / "plain.pt"
    torch.save({"state": {"model": {"model.lm_head.weight": torch.zeros(1)}}}, not_ours)
    with pytest.raises(ValueError, match="carries no model config .*not a checkpoint of llmshear's train.py"):
        export_checkpoint(not_ours, tmp_path / "new")
    with pytest.raises(FileNotFoundError):
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "out", "plain.pt", "truncated.pt"]


class _PruningModel(ComposerModel):
    """The layout of ComposerLlama that checkpoints depend on: the LlamaLM as ``.model``, the L0Module as ``.l0``."""

    def __init__(self, model, l0):
        super().__init__()
        self.model, self.l0 = model, l0

    def forward(self, batch):
        return self.model(batch[0], self.l0())

    def loss(self, outputs, batch):
        ce = F.cross_entropy(outputs[:, :-1].flatten(0, 1), batch[0][:, 1:].flatten())
        return ce + self.l0.lagrangian_loss()


def test_prune_a_checkpoint_written_by_composers_trainer(tmp_path):
    cfg = PRESETS["tiny-qwen2"]()
    l0 = L0Module(cfg, TargetShape.from_dict(_target_for(cfg, "all"), cfg))
    model = _PruningModel(build_model(cfg, seed=0), l0)
    data = DataLoader(TensorDataset(torch.randint(0, cfg.vocab_size, (4, 16))), batch_size=2)
    trainer = Trainer(model=model, train_dataloader=data, max_duration="2ba", save_folder=str(tmp_path / "ckpt"),
                      optimizers=torch.optim.Adam(model.parameters(), lr=0.05), device="cpu", progress_bar=False)
    trainer.fit()
    trainer.close()
    summary = export_checkpoint(tmp_path / "ckpt" / "latest-rank0.pt", tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = _tokens(cfg)
    with torch.no_grad():
        assert (hf(tokens).logits - model.model(tokens, l0.deterministic_masks())).abs().max() <= TOL
    assert summary["pruned"] == {k: getattr(l0.target.to_config(cfg), k) for k in summary["pruned"]}


ADVERSARIAL_LOGITS = {
    "all equal": lambda shape: torch.zeros(shape),
    "all far negative (gates underflow to 0)": lambda shape: torch.full(shape, -1e4),
    "all -inf": lambda shape: torch.full(shape, -torch.inf),
    "all +inf": lambda shape: torch.full(shape, torch.inf),
    "all NaN": lambda shape: torch.full(shape, torch.nan),
    "NaN, inf and far negative mixed": lambda shape: torch.tensor([torch.nan, -torch.inf, -1e4, torch.inf])
    .repeat(shape[-1] // 4 + 1)[: shape[-1]].expand(shape).clone(),
}


@pytest.mark.parametrize("structure", ["layer", "kv_group", "head", "intermediate", "hidden", "all"])
@pytest.mark.parametrize("kind", list(ADVERSARIAL_LOGITS))
def test_the_cut_reaches_the_target_whatever_the_gate_logits(structure, kind):
    """A huge ``optimizer.lag_lr`` drives kept gates to exactly 0 (or NaN): the cut still has the target shape."""
    cfg = PRESETS["tiny-gqa"]()
    target = TargetShape.from_dict(_target_for(cfg, structure), cfg)
    l0 = L0Module(cfg, target)
    with torch.no_grad():
        for log_alpha in l0.log_alpha.values():
            log_alpha.copy_(ADVERSARIAL_LOGITS[kind](log_alpha.shape))
    masks = l0.deterministic_masks()
    for spec in l0.specs:
        kept = masks[spec.name] != 0
        assert (kept.sum(-1) == spec.keep).all(), spec.name
        assert torch.isfinite(masks[spec.name]).all() and (masks[spec.name] >= 0).all()
        if kind in ("all equal", "all NaN"):  # ties go to the lower index
            assert kept[..., : spec.keep].all() and not kept[..., spec.keep:].any()
    assert plan_cut(cfg, masks).config(cfg) == target.to_config(cfg)
    cut = cut_model(build_model(cfg, seed=0), masks)
    assert cut.cfg == target.to_config(cfg)
    assert all(torch.isfinite(p).all() for p in cut.parameters())


def test_one_shot_pruning_from_a_recipe_cuts_by_the_runs_calibration_batches(tmp_path, capsys):
    export_script = script("export_hf")
    data = write_mds(tmp_path / "data", DOMAINS, seq_len=32)
    recipe = tiny_recipe(tmp_path, data, run="one_shot")
    out = tmp_path / "out"
    assert export_script.main(["--recipe", str(recipe), "--out", str(out), "pruning.init_batches=3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = load(recipe, ["pruning.init_batches=3"])
    model = load_model(cfg.model.pretrained)
    batches = run_calibration_batches(cfg)
    masks = importance_masks(model, TargetShape.from_dict(cfg.pruning.target, model.cfg), batches)
    saved = torch.load(out / "masks.pt", weights_only=True)
    assert saved.keys() == masks.keys() and all(torch.equal(saved[k], masks[k]) for k in masks)
    assert summary["stages"][-1]["stage"] == "one-shot pruning" and summary["stages"][-1]["batches"] == 0
    assert summary["stages"][-1]["tokens"] == 3 * 2 * 32  # three calibration batches of two sequences, read only
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _tokens(model.cfg)
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens, masks)).abs().max() <= TOL
    assert hf.config.hidden_size == cfg.pruning.target["d_model"] and summary["params_after"] == hf.num_parameters()


def test_one_shot_pruning_refuses_bad_arguments_before_reading_a_weight(tmp_path, capsys, caplog):
    export_script = script("export_hf")
    data = write_mds(tmp_path / "data", DOMAINS, seq_len=32)
    plain = tiny_recipe(tmp_path, data, run="plain", prune=False)
    assert export_script.main(["--recipe", str(plain), "--out", str(tmp_path / "a")]) == 2
    assert "not a pruning recipe" in caplog.text
    recipe = tiny_recipe(tmp_path, data, run="bad")
    assert export_script.main(["--recipe", str(recipe), "--out", str(tmp_path / "b"), "pruning.init_batches=0"]) == 2
    assert "pruning.init_batches" in caplog.text
    for argv, message in ((["--checkpoint", "x.pt", "--out", "c", "seed=4"], "apply to --recipe only"),
                          (["--checkpoint", "x.pt", "--recipe", str(recipe), "--out", "c"], "not allowed with")):
        with pytest.raises(SystemExit) as exit_info:
            export_script.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))
