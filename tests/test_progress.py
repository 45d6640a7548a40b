"""Progress reporting (llmshear.progress) and the evaluation scripts' --device / --dtype."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from data_fixtures import random_shards
from script_modules import script

from llmshear.progress import progress

VOCAB = 64


def test_without_a_terminal_progress_is_logged_at_an_interval(caplog):
    with caplog.at_level(logging.INFO, logger="llmshear.progress"):
        assert list(progress(range(5), 5, "eval", "batch", interval=0.0)) == list(range(5))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("eval: 1/5 batch (20%)") and "ETA" in lines[0]
    assert lines[-1].startswith("eval: 5/5 batch (100%)") and lines[-1].endswith("(done)")
    assert len(lines) == 6  # one per item at interval 0, and the closing line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llmshear.progress"):
        assert list(progress(iter("abc"), None, "tokenize", "file")) == ["a", "b", "c"]
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["tokenize: 3 file"]  # 30 s interval: last only


def test_progress_can_be_silenced_or_forced_to_a_bar(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="llmshear.progress"):
        assert list(progress(range(3), 3, "eval", enabled=False)) == [0, 1, 2]
        assert list(progress(range(3), 3, "bar", enabled=True)) == [0, 1, 2]
    assert not caplog.records and "bar: 100%" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model_and_data(tmp_path_factory):
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    root = tmp_path_factory.mktemp("data")
    random_shards(root, {"web": 4, "code": 3}, seq_len=12, vocab=VOCAB, split="eval")
    return directory, root / "eval"


def test_eval_ppl_dtype_and_progress(tiny_model_and_data, capsys, caplog):
    model, data = tiny_model_and_data
    losses = {}
    for dtype in ("float32", "bfloat16"):
        with caplog.at_level(logging.INFO):
            code = script("eval_ppl").main(["--model", str(model), "--data", str(data), "--batch-size", "2",
                                     "--dtype", dtype, "--device", "cpu"])
        assert code == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        losses[dtype] = [result["models"][str(model)]["domains"][d]["loss"] for d in ("web", "code")]
    assert losses["bfloat16"] != losses["float32"]  # the model really ran in bfloat16 ...
    assert losses["bfloat16"] == pytest.approx(losses["float32"], abs=0.05)  # ... and agrees to bf16 precision
    assert "eval: 4/4 batch (100%)" in caplog.text  # 7 sequences in batches of 2; not a terminal: log lines


def test_eval_ppl_refuses_a_device_it_does_not_have(tiny_model_and_data, caplog):
    model, data = tiny_model_and_data
    with caplog.at_level(logging.ERROR):
        assert script("eval_ppl").main(["--model", str(model), "--data", str(data), "--device", "cuda:99"]) == 2
        assert script("eval_ppl").main(["--model", str(model), "--data", str(data), "--device", "tpu?"]) == 2
    assert "--device cuda:99: this machine has" in caplog.text and "--device 'tpu?'" in caplog.text
