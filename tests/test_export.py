"""Exports ready to use: tokenizer by default, dtype, generation config, summary and model card, and refusals.

A tiny model with SmolLM2's vocabulary and tokenizer trains 2 batches through train.py; scripts/export_hf.py then
writes a directory that ``AutoTokenizer``, ``AutoModelForCausalLM`` and ``pipeline`` load with no code of ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from recipe_fixtures import DOMAINS, tiny_recipe, write_mds
from script_modules import script
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from llmshear import run as train
from llmshear.models.build import PRESETS, build_model
from llmshear.models.hf import save_pretrained
from llmshear.sources import load_tokenizer

SEQ_LEN, BATCHES, GLOBAL_BATCH = 32, 2, 4


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A source directory (tiny shape, SmolLM2's vocabulary, its tokenizer) and a 2-batch continued run of it."""
    tmp = tmp_path_factory.mktemp("export")
    tokenizer = load_tokenizer("smollm2")
    cfg = dataclasses.replace(PRESETS["tiny-qwen2"](), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, hf_model_type="llama", qkv_bias=False)
    save_pretrained(build_model(cfg, seed=0), tmp / "source", tokenizer=tokenizer)
    (tmp / "source" / "README.md").write_text("---\nlicense: llama2\n---\n# the source's card\n")
    config = json.loads((tmp / "source" / "config.json").read_text())
    (tmp / "source" / "config.json").write_text(json.dumps({**config, "_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    data = write_mds(tmp / "data", DOMAINS, SEQ_LEN)
    recipe = tiny_recipe(tmp, data, run="continue", prune=False, model={"pretrained": str(tmp / "source")},
                         train={"max_batches": BATCHES, "eval_interval": BATCHES, "global_batch_size": GLOBAL_BATCH},
                         checkpoint={"save_interval": BATCHES})
    assert train.main([str(recipe)]) == 0
    return tmp


def test_export_saves_the_runs_tokenizer_card_and_dtype_and_loads_with_transformers_alone(run, capsys):
    out = run / "final"
    assert script("export_hf").main(["--checkpoint", str(run / "continue" / "latest-rank0.pt"), "--out", str(out),
                            "--dtype", "bfloat16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["tokenizer"] == str((run / "source").resolve()) and summary["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file()
    [stage] = summary["stages"]
    assert stage["stage"] == "continued" and stage["batches"] == BATCHES
    assert stage["tokens"] == BATCHES * GLOBAL_BATCH * SEQ_LEN
    assert set(summary["perplexity"]["perplexity"]) == set(DOMAINS) and summary["perplexity"]["batch"] == BATCHES
    card = (out / "README.md").read_text()
    assert f"{stage['tokens']:,}" in card and "python scripts/export_hf.py" in card and "| n_layers | 4 |" in card
    front = ModelCard.load(out / "README.md").data  # the hub's metadata, from the source's card and config
    assert (front.license, front.base_model, front.library_name) == ("llama2", "meta-llama/Llama-2-7b-hf",
                                                                     "transformers")
    assert "llmshear" in front.tags and front.pipeline_tag == "text-generation"

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")  # the dtype config.json records
    assert model.dtype == torch.bfloat16 and model.num_parameters() == summary["params"]
    assert tokenizer("hello world").input_ids == load_tokenizer("smollm2")("hello world").input_ids
    generator = pipeline("text-generation", model=str(out), device="cpu")
    text = generator("The capital of France is", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")


def test_export_without_a_tokenizer_and_from_a_named_one(run, caplog):
    checkpoint = str(run / "continue" / "latest-rank0.pt")
    export = script("export_hf").main
    assert export(["--checkpoint", checkpoint, "--out", str(run / "bare"), "--tokenizer", "none"]) == 0
    assert not (run / "bare" / "tokenizer.json").exists()
    assert json.loads((run / "bare" / "summary.json").read_text())["tokenizer"] is None
    assert export(["--checkpoint", checkpoint, "--out", str(run / "named"), "--tokenizer", "smollm2"]) == 0
    assert AutoTokenizer.from_pretrained(run / "named").eos_token == load_tokenizer("smollm2").eos_token


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_writing(run, caplog):
    larger = load_tokenizer("smollm2")
    larger.add_tokens([f"<extra_{i}>" for i in range(3)])  # ids past the model's embedding rows
    larger.save_pretrained(run / "larger_tokenizer")
    checkpoint = str(run / "continue" / "latest-rank0.pt")
    out = run / "with_larger"
    assert script("export_hf").main(["--checkpoint", checkpoint, "--out", str(out), "--tokenizer",
                                     str(run / "larger_tokenizer")]) == 2
    assert f"{len(larger)} tokens, more than the model's {len(larger) - 3} embedding rows" in caplog.text
    assert not out.exists()


def test_a_tokenizer_directory_without_tokenizer_files_is_refused_before_writing(run, caplog):
    no_tokenizer = run / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    before = digest(run)
    with caplog.at_level(logging.ERROR):
        code = script("export_hf").main(["--checkpoint", str(run / "continue" / "latest-rank0.pt"), "--out",
                                str(run / "out"), "--tokenizer", str(no_tokenizer)])
    assert code == 2 and f"{no_tokenizer} has no tokenizer" in caplog.text and "Traceback" not in caplog.text
    assert digest(run) == before and not (run / "out").exists()


def test_non_finite_weights_are_refused_and_nothing_is_written(run, caplog):
    checkpoint = torch.load(run / "continue" / "latest-rank0.pt", weights_only=False)
    checkpoint["state"]["model"]["model.model.norm.weight"][3] = float("nan")
    broken = run / "diverged.pt"
    torch.save(checkpoint, broken)
    with caplog.at_level(logging.ERROR):
        code = script("export_hf").main(["--checkpoint", str(broken), "--out", str(run / "nan")])
    assert code == 2 and "NaN or inf" in caplog.text and "model.norm.weight" in caplog.text
    assert not (run / "nan").exists() and not list(run.glob(".nan.*"))
