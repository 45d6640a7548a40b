"""Distillation: the loss is the formula, the teacher never changes, the student learns from it."""

import math

import pytest
import torch
from recipe_fixtures import DOMAINS, tiny_recipe, write_mds

from llmshear.builders import build_composer_model
from llmshear.config import ConfigError, load
from llmshear.models.composer_llama import ComposerLlama, Distillation
from llmshear.models.llama import LlamaConfig, LlamaLM


def tiny(seed: int) -> LlamaLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, intermediate_size=24)
    return LlamaLM(cfg)


def test_distill_loss_equals_formula_on_toy_logits():
    teacher = tiny(0)
    distill = Distillation(teacher, alpha=0.3, temperature=2.0)
    input_ids = torch.tensor([[1, 2, 3]])
    labels = torch.tensor([[2, -100]])
    student = torch.randn(1, 2, 32)
    with torch.no_grad():
        t_logits = teacher(input_ids)[:, :-1]
    # Only the first position counts: the second label is ignored.
    p = torch.softmax(t_logits[0, 0] / 2.0, -1).tolist()
    q = torch.softmax(student[0, 0] / 2.0, -1).tolist()
    expected = 4.0 * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    assert abs(distill.loss(student, labels, input_ids).item() - expected) < 1e-5


def batch_of(ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "labels": ids, "domain": torch.zeros(len(ids), dtype=torch.long)}


def test_total_mixes_ce_and_distill():
    model = ComposerLlama(tiny(1), distill=Distillation(tiny(0), alpha=0.25, temperature=1.0))
    batch = batch_of(torch.randint(0, 32, (2, 8)))
    losses = model.loss(model(batch), batch)
    assert torch.allclose(losses["total"], 0.75 * losses["ce"] + 0.25 * losses["distill"])


def test_student_moves_towards_frozen_teacher():
    teacher, student = tiny(0), tiny(1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = ComposerLlama(student, distill=Distillation(teacher, alpha=1.0, temperature=2.0))
    assert not any("teacher" in n for n, _ in model.named_parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = batch_of(torch.randint(0, 32, (2, 8)))
    history = []
    for _ in range(20):
        losses = model.loss(model(batch), batch)
        history.append(losses["distill"].item())
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    assert history[-1] < 0.5 * history[0]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_a_bfloat16_teacher_is_held_in_bfloat16_and_agrees_with_the_float32_one(tmp_path):
    """``distill.dtype: bfloat16`` halves the teacher's memory (every rank holds a whole copy); its distillation
    loss stays close to the float32 teacher's, and the student stays float32."""
    recipe = tiny_recipe(tmp_path, write_mds(tmp_path / "data", DOMAINS, 32, n_train=8),
                         distill={"teacher": "tiny-gqa", "alpha": 0.5})
    models = {dtype: build_composer_model(load(recipe, [f"distill.dtype={dtype}"]))
              for dtype in ("float32", "bfloat16")}
    assert {p.dtype for p in models["bfloat16"].distill.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in models["bfloat16"].model.parameters()} == {torch.float32}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 32), generator=generator)
    student = torch.randn(2, 31, 256, generator=generator)  # a student unlike the teacher: the KL is far from 0
    logits = {dtype: model.distill.teacher_logits(ids) for dtype, model in models.items()}
    assert logits["bfloat16"].dtype == torch.float32
    assert (logits["bfloat16"] - logits["float32"]).abs().max() < 0.05 * logits["float32"].abs().max()
    losses = {dtype: model.distill.loss(student, ids[:, 1:], ids).item() for dtype, model in models.items()}
    assert losses["float32"] > 0.1 and losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)


def test_an_unknown_teacher_dtype_is_a_config_error_naming_the_key(tmp_path):
    recipe = tiny_recipe(tmp_path, write_mds(tmp_path / "data", DOMAINS, 32, n_train=8),
                         distill={"teacher": "tiny-gqa"})
    with pytest.raises(ConfigError, match="distill.dtype"):
        load(recipe, ["distill.dtype=float8"])
