"""scripts/generate.py: a saved model generates through ``transformers`` alone."""

from __future__ import annotations

import dataclasses

from data_fixtures import REPO, tiny_tokenizer  # noqa: F401 (tiny_tokenizer is a fixture)
from script_modules import script
from transformers import AutoTokenizer

from llmshear.models.build import PRESETS, build_model
from llmshear.models.hf import save_pretrained


def test_generate_prints_the_prompt_and_its_continuation(tmp_path, tiny_tokenizer, capsys):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    cfg = dataclasses.replace(PRESETS["tiny-llama2"](), vocab_size=len(tokenizer))
    save_pretrained(build_model(cfg, seed=0), tmp_path / "model", tokenizer=tokenizer)
    argv = ["--model", str(tmp_path / "model"), "--prompt", "the cat", "--max-new-tokens", "8"]
    assert script("generate").main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("the cat") and len(text.rstrip("\n")) > len("the cat")
