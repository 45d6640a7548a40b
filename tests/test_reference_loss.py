"""Reference losses (scripts/reference_loss.py, llmshear.datasets.reference): source model and scaling fit."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
import yaml
from data_fixtures import random_shards
from script_modules import script

from llmshear.datasets.mds import MDSDomain
from llmshear.datasets.reference import eval_domains, read_sizes, scaling_reference, split_fingerprints

VOCAB = 64


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny transformers LlamaForCausalLM saved as an HF directory, and the model itself."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    random_shards(root, {"web": 5, "code": 3, "wiki": 4}, seq_len=12, vocab=VOCAB, split="eval")
    (root / "summary.json").write_text(json.dumps({"vocab_size": VOCAB, "domains": {"web": {}, "code": {},
                                                                                     "wiki": {}}}))
    return root / "eval"


def _expected(model, directory, limit=None):
    domain = MDSDomain(directory)
    ids = torch.stack([torch.from_numpy(domain[i].astype("int64")) for i in range(min(limit or len(domain),
                                                                                       len(domain)))])
    with torch.no_grad():
        logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def _run(capsys, argv):
    code = script("reference_loss").main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    return code, out


def test_source_reference_matches_the_hf_model(hf_model, eval_dir, capsys):
    directory, model = hf_model
    code, out = _run(capsys, ["--source", str(directory), "--data", str(eval_dir), "--batch-size", "2"])
    assert code == 0
    result = json.loads(out[-1])
    assert result["domains"] == ["web", "code", "wiki"] == eval_domains(eval_dir)
    expected = [_expected(model, eval_dir / d) for d in result["domains"]]
    assert result["reference_losses"] == pytest.approx(expected, abs=1e-4)
    assert result["tokens"] == [5 * 11, 3 * 11, 4 * 11]
    assert result["split"] == str(eval_dir)  # what preflight compares a run's eval split with
    assert result["eval_fingerprints"] == split_fingerprints(eval_dir, result["domains"])
    block = yaml.safe_load("\n".join(out[:-1]))
    assert block["reference_losses"] == pytest.approx(expected, abs=1e-4)


def test_source_reference_with_domain_order_and_limit(hf_model, eval_dir, capsys):
    directory, model = hf_model
    code, out = _run(capsys, ["--source", str(directory), "--data", str(eval_dir), "--domains", "wiki,web",
                              "--max-seqs", "2"])
    result = json.loads(out[-1])
    assert code == 0 and result["domains"] == ["wiki", "web"] and result["tokens"] == [22, 22]
    assert result["reference_losses"] == pytest.approx([_expected(model, eval_dir / d, 2) for d in ("wiki", "web")],
                                                       abs=1e-4)


def test_vocabulary_mismatch_is_refused(eval_dir, capsys, caplog, tmp_path):
    summary = eval_dir.parent / "summary.json"
    original = summary.read_text()
    summary.write_text(json.dumps({"vocab_size": 100_000}))
    try:
        with caplog.at_level(logging.ERROR):
            code, _ = _run(capsys, ["--source", "tiny-llama2", "--data", str(eval_dir)])
    finally:
        summary.write_text(original)
    assert code == 2 and "(vocabulary 100000), larger than model 'tiny-llama2''s vocabulary of 256" in caplog.text


def test_scaling_fit_predicts_the_target(tmp_path, capsys):
    laws = {"cc": (400.0, 0.3, 1.6), "github": (90.0, 0.25, 0.5)}
    sizes = [1.25e8, 3.5e8, 7.5e8, 2.7e9, 7e9]
    models = [{"params": n, "losses": [a / n ** b + c for a, b, c in laws.values()]} for n in sizes]
    models[1] = {"params": sizes[1], "reference_losses": models[1]["losses"], "source": "a --source result"}
    path = tmp_path / "sizes.json"
    path.write_text(json.dumps({"domains": list(laws), "models": models}))
    code, out = _run(capsys, ["--fit", str(path), "--target-params", "1.3e9"])
    assert code == 0
    expected = [a / 1.3e9 ** b + c for a, b, c in laws.values()]
    assert json.loads(out[-1])["reference_losses"] == pytest.approx(expected, abs=1e-4)
    assert yaml.safe_load("\n".join(out[:-1]))["reference_losses"] == pytest.approx(expected, abs=1e-4)
    assert scaling_reference(path, 1.3e9)["fits"]["cc"]["b"] == pytest.approx(0.3, rel=1e-3)


@pytest.mark.parametrize(("content", "message"), [
    ({"domains": ["a"]}, "expected {'domains'"),
    ({"domains": ["a"], "models": [{"params": 1e9, "losses": [1.0, 2.0]}]}, r"models\[0\].losses must be 1 finite"),
    ({"domains": ["a"], "models": [{"losses": [1.0]}]}, r"models\[0\] needs a positive 'params'"),
])
def test_bad_sizes_files_are_named(tmp_path, content, message):
    path = tmp_path / "sizes.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_sizes(path)


def test_fit_needs_three_sizes_and_arguments_are_checked(tmp_path, capsys):
    path = tmp_path / "sizes.json"
    path.write_text(json.dumps({"domains": ["a"], "models": [{"params": 1e8, "losses": [3.0]},
                                                             {"params": 1e9, "losses": [2.0]}]}))
    assert script("reference_loss").main(["--fit", str(path), "--target-params", "5e8"]) == 2
    for argv in (["--source", "smollm2"], ["--fit", str(path)]):
        with pytest.raises(SystemExit):
            script("reference_loss").main(argv)
