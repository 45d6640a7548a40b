"""A tiny pruning run through train.py's functions, then cut → continued pre-training → HF export → evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from recipe_fixtures import DOMAINS, tiny_recipe, write_mds
from script_modules import script
from transformers import AutoModelForCausalLM

from llmshear import run as train
from llmshear.config import load
from llmshear.loggers import read_metrics
from llmshear.models.hf import load_model
from llmshear.tools.evaluation import evaluate_domains
from llmshear.tools.export import export_checkpoint, model_from_checkpoint

TARGET = {"d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 1, "intermediate_size": 96}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Prune tiny-gqa for 6 batches (distilling from itself, hardened from batch 4), cut it, continue 4 batches
    from the cut model, export the result."""
    tmp = tmp_path_factory.mktemp("pipeline")
    data = write_mds(tmp / "data", DOMAINS, 32)
    assert train.main([str(tiny_recipe(tmp, data, run="prune", distill={"teacher": "tiny-gqa"}))]) == 0
    prune_folder = tmp / "prune"
    export_checkpoint(prune_folder / "latest-rank0.pt", tmp / "pruned")
    recipe = tiny_recipe(tmp, data, run="continue", prune=False, model={"pretrained": str(tmp / "pruned")},
                         data={"proportions": None, "proportions_from": str(prune_folder / "proportions.json")},
                         train={"max_batches": 4, "eval_interval": 2}, checkpoint={"save_interval": 2})
    assert train.main([str(recipe)]) == 0
    summary = export_checkpoint(tmp / "continue" / "latest-rank0.pt", tmp / "final")
    return {"tmp": tmp, "data": data, "summary": summary}


def test_pruning_run_leaves_checkpoints_masks_metrics_and_proportions(pipeline):
    folder = pipeline["tmp"] / "prune"
    assert {p.name for p in folder.glob("*.pt")} == {"ep0-ba3-rank0.pt", "ep0-ba6-rank0.pt", "latest-rank0.pt"}
    for batch in (3, 6):
        summary = json.loads((folder / "masks" / f"ba{batch}.json").read_text())
        assert summary["shape"] == TARGET and summary["batch"] == batch
    rows = read_metrics(folder / "metrics.jsonl")
    assert {r["batch"] for r in rows if "l0/layer/expected_sparsity" in r} == set(range(1, 7))
    assert {r["batch"] for r in rows if r.get("l0/hardened") == 1.0} == {5, 6}  # harden_from 0.7 of 6: batch 4 on
    assert all("l0/intermediate/undecided" in r for r in rows if "l0/layer/expected_sparsity" in r)
    # constraint exact: the expected size is the scheduled one at every batch (ramp over 0.3 of 6 batches)
    for r in rows:
        if "l0/intermediate/expected_sparsity" in r:
            assert r["l0/intermediate/expected_sparsity"] == pytest.approx(r["l0/intermediate/target_sparsity"],
                                                                            abs=1e-3)
    assert any("loss/train/distill" in r for r in rows)  # distillation from the source, in the pruning stage
    final = json.loads((folder / "masks" / "ba6.json").read_text())
    assert final["hardened"] is True and all(c["size_error"] < 1e-3 for c in final["cut_report"].values())
    masks = torch.load(folder / "masks" / "ba6.pt")
    assert all(((m == 0) | (m == 1)).all() for m in masks.values())  # the cut folds nothing: 0/1 masks
    last = {k: v for r in rows if r.get("batch") == 6 for k, v in r.items()}
    # after hardening the current model and the target cut are one model
    assert last["metrics/eval/LanguageCrossEntropy"] == pytest.approx(last["metrics/eval_target/LanguageCrossEntropy"])
    assert any(f"metrics/eval/DomainCE/{d}" in r for r in rows for d in DOMAINS) or any(
        any(k.startswith("metrics/eval/") and d in k for k in r) for r in rows for d in DOMAINS)
    proportions = json.loads((folder / "proportions.json").read_text())
    assert proportions["domains"] == DOMAINS and math.isclose(sum(proportions["proportions"]), 1.0, abs_tol=1e-6)


def test_continued_run_starts_from_the_cut_model_and_its_proportions(pipeline):
    tmp = pipeline["tmp"]
    cut = load_model(tmp / "pruned")
    cfg = load(tmp / "continue.yaml", ["checkpoint.autoresume=true"])
    first = torch.load(tmp / "continue" / "ep0-ba2-rank0.pt", weights_only=False)
    before = first["state"]["model"]["model.lm_head.weight"]
    assert before.shape == cut.lm_head.weight.shape  # the cut shape, not the source's
    assert not any(k.startswith("l0.") for k in first["state"]["model"])
    rows = read_metrics(tmp / "continue" / "metrics.jsonl")
    first_ce = next(r["loss/train/ce"] for r in rows if "loss/train/ce" in r)
    pruned = read_metrics(tmp / "prune" / "metrics.jsonl")
    cut_ce = [r["metrics/eval_target/LanguageCrossEntropy"] for r in pruned
              if "metrics/eval_target/LanguageCrossEntropy" in r][-1]  # the cut model, at the pruning run's end
    # started from the cut model (random weights of its shape start at about log(vocab) = 5.55 here, and the
    # cut, trained on this data, is at about 5.1 on the eval split)
    assert abs(first_ce - cut_ce) < 0.4 and first_ce < math.log(cut.cfg.vocab_size) - 0.4
    assert cfg.data.proportions == json.loads((tmp / "prune" / "proportions.json").read_text())["proportions"]


def test_export_loads_in_transformers_with_the_same_logits(pipeline):
    tmp = pipeline["tmp"]
    ours = model_from_checkpoint(tmp / "continue" / "latest-rank0.pt").eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp / "final").eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=1e-4)
    assert pipeline["summary"]["shape"] == TARGET
    # the card's history: the pruning stage (from the cut model's summary.json), then the continued one
    stages = pipeline["summary"]["stages"]
    assert [(s["stage"], s["batches"], s["tokens"]) for s in stages] == [("pruning", 6, 6 * 4 * 32),
                                                                          ("continued", 4, 4 * 4 * 32)]
    assert stages[0]["source"] == "tiny-gqa" and stages[1]["source"] == str((tmp / "pruned").resolve())
    results = evaluate_domains(load_model(tmp / "final"), pipeline["data"] / "eval", DOMAINS)
    assert set(results["domains"]) == set(DOMAINS) and all(math.isfinite(r["ppl"]) for r in results["domains"].values())


def test_export_goes_by_the_checkpoint_kind_and_refuses_to_overwrite(pipeline):
    tmp = pipeline["tmp"]
    cut = json.loads((tmp / "pruned" / "config.json").read_text())  # a pruning checkpoint: cut to the target
    assert (cut["hidden_size"], cut["num_hidden_layers"], cut["intermediate_size"]) == \
        (TARGET["d_model"], TARGET["n_layers"], TARGET["intermediate_size"])
    assert (tmp / "pruned" / "masks.pt").is_file() and not (tmp / "final" / "masks.pt").exists()
    before = sorted(p.name for p in (tmp / "final").iterdir())
    with pytest.raises(FileExistsError):
        export_checkpoint(tmp / "continue" / "latest-rank0.pt", tmp / "final")
    assert sorted(p.name for p in (tmp / "final").iterdir()) == before
    truncated = tmp / "truncated.pt"
    truncated.write_bytes((tmp / "continue" / "latest-rank0.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        export_checkpoint(truncated, tmp / "other")
    assert not (tmp / "other").exists()


def test_scripts_plot_the_runs_and_tabulate_perplexity(pipeline, capsys):
    tmp = pipeline["tmp"]
    plot_run, eval_ppl = script("plot_run"), script("eval_ppl")
    assert plot_run.main([str(tmp / "prune"), str(tmp / "continue"), "--out", str(tmp / "plots")]) == 0
    assert {p.name for p in (tmp / "plots").iterdir()} == {"domain_weights.png", "loss_gap.png", "sparsity.png",
                                                           "undecided.png"}
    assert plot_run.main([str(tmp / "prune"), "--out", str(tmp / "plots")]) == 2  # never overwrites silently
    capsys.readouterr()
    assert eval_ppl.main(["--model", str(tmp / "pruned"), "--model", str(tmp / "final"), "--data",
                          str(pipeline["data"] / "eval")]) == 0
    lines = capsys.readouterr().out.splitlines()
    result = json.loads(lines[-1])
    assert set(result["models"]) == {str(tmp / "pruned"), str(tmp / "final")}
    assert lines[0].split()[0] == "domain" and {line.split()[0] for line in lines[1:-1]} == {*DOMAINS, "mean"}
    final = result["models"][str(tmp / "final")]
    assert final["mean_ppl"] == pytest.approx(math.exp(final["mean_loss"]))


def test_invalid_recipe_exits_2_before_any_work(tmp_path, caplog):
    data = write_mds(tmp_path / "data", DOMAINS, 32, n_train=2, n_eval=1)
    recipe = tiny_recipe(tmp_path, data)
    assert train.main([str(recipe), "train.max_batchs=3", "data.proportions=[1,1,1]"]) == 2
    assert "train.max_batchs" in caplog.text and "data.proportions" in caplog.text
    assert not (tmp_path / "run").exists()
