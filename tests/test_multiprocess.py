"""``composer -n 2`` on CPU, DDP and FSDP2 with activation checkpointing: the ranks agree on gates, λ, proportions."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from recipe_fixtures import DOMAINS, tiny_recipe, write_mds

from llmshear import run as train
from llmshear.loggers import read_metrics
from llmshear.tools.export import load_pruning_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHORT = {"train": {"max_batches": 4, "eval_interval": 2}, "checkpoint": {"save_interval": 4}}
LAYER_LOSS = {"layer_choice": "loss", "temperature": 2.0, "final_temperature": 2.0,
              "layer_final_temperature": 2.0}  # warm: every gate undecided
TARGET_D_MODEL = 64


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One launch of 2 processes runs the DDP recipe, then the FSDP2 one (start-up dominates the time); both with
    the default constraint (exact), hardened at batch 3 of 4, plus a DDP run with per-row multipliers, an FSDP2 run
    whose freeze compares layer cuts (``fsdp_layers``) and a DDP run without pruning (``plain``), which one
    process then runs again (``single``)."""
    tmp = tmp_path_factory.mktemp("mp")
    data = write_mds(tmp / "data", DOMAINS, 32, n_train=16)
    row = {"constraint": "row"}
    recipes = [tiny_recipe(tmp, data, run="ddp", **SHORT),
               tiny_recipe(tmp, data, run="fsdp", fsdp={"enabled": True, "activation_checkpointing": True}, **SHORT),
               tiny_recipe(tmp, data, run="ddp_row", pruning=row, **SHORT),
               tiny_recipe(tmp, data, run="fsdp_layers", fsdp={"enabled": True}, pruning=LAYER_LOSS, **SHORT),
               tiny_recipe(tmp, data, run="plain", prune=False, **SHORT)]
    launcher = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "composer"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    result = subprocess.run([str(launcher), "-n", "2", "--stderr", str(tmp / "rank{rank}.err"),
                             str(REPO / "tests" / "mp_probe.py"), *map(str, recipes)],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + (tmp / "rank1.err").read_text()
    assert train.main([str(tiny_recipe(tmp, data, run="single", prune=False, **SHORT))]) == 0  # `plain`, 1 process
    return tmp


def probes(folder: Path) -> tuple[dict, dict]:
    return torch.load(folder / "probe-rank0.pt"), torch.load(folder / "probe-rank1.pt")


@pytest.mark.parametrize("kind", ["ddp", "fsdp", "ddp_row", "fsdp_layers"])
def test_ranks_agree_on_gates_multipliers_and_proportions(runs, kind):
    rank0, rank1 = probes(runs / kind)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["l0"].keys() == rank1["l0"].keys()
    for name, value in rank0["l0"].items():  # gate logits, multipliers, shifts, hardened 0/1 masks
        assert torch.equal(value, rank1["l0"][name]), name
    assert rank0["proportions"] == rank1["proportions"]
    assert rank0["proportions"] != pytest.approx([0.5, 0.3, 0.2], abs=1e-3)  # the two updates moved them
    assert rank0["l0"]["hardened"].item()  # trained on after hardening: DDP got a gradient for every gate logit
    if kind == "ddp_row":
        assert rank0["l0"]["lagrangian.lambda1.layer"].item() != 0.0
    else:
        assert not any(name.startswith("lagrangian.") for name in rank0["l0"])
    if kind == "fsdp_layers":  # each rank saw its own half of the batch: the summed losses chose for both
        choices = [row for row in read_metrics(runs / kind / "metrics.jsonl") if "l0/layer_choice/rank" in row]
        assert [row["l0/layer_choice/candidates"] for row in choices] == [4]


def test_ddp_and_fsdp_wrap_as_configured_and_train_alike(runs):
    ddp, fsdp = probes(runs / "ddp")[0], probes(runs / "fsdp")[0]
    assert ddp["wrapper"] == "DistributedDataParallel" and ddp["layer_types"] == ["DecoderLayer", "DecoderLayer"]
    assert fsdp["layer_types"][0] == "CheckpointWrapper" and fsdp["layer_types"][1].startswith("FSDP")
    assert fsdp["proportions"] == pytest.approx(ddp["proportions"], abs=1e-4)
    for name, value in ddp["l0"].items():
        if name.startswith("log_alpha."):  # Adam turns rounding-level differences of near-zero gradients into
            assert ((fsdp["l0"][name] - value).abs() > 1e-3).float().mean() < 0.25, name  # rare lr-sized steps
        elif name.startswith("hard_"):
            assert (fsdp["l0"][name] != value).float().mean() < 0.05, name
        elif name.startswith("shift_"):  # solved from the logits at every batch: they follow them
            assert (fsdp["l0"][name] - value).abs().max() < 1.0, name
        elif name.startswith("usage_"):  # sums of P(z != 0) over the batches since the ramp: they follow them too
            per_batch = (fsdp["l0"][name] - value).abs() / ddp["l0"]["usage_batches"].item()
            assert ddp["l0"]["usage_batches"].item() > 0 and (per_batch > 0.05).float().mean() < 0.05, name
        else:
            assert torch.equal(fsdp["l0"][name], value), name
    # FSDP2's clipping norms the DTensor gradients over both ranks' shards: the global norm of what FSDP2 reduced,
    # the ranks' mean as DDP's (gloo's reduce-scatter sums; FSDPGradientMean divides), so the same norms as DDP's;
    # the clipping engaged in both runs (the norms are above clip_norm's default 1.0)
    norms = [[row["train/grad_norm"] for row in read_metrics(runs / kind / "metrics.jsonl")
              if "train/grad_norm" in row] for kind in ("ddp", "fsdp")]
    assert len(norms[0]) == 4 and min(norms[0]) > 1.0
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)
    weights = [torch.load(runs / kind / "latest-rank0.pt", weights_only=False)["state"]["model"]
               for kind in ("ddp", "fsdp")]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():  # the same weights to float rounding (measured: 1e-7 relative)
        if name.startswith("model.") and value.is_floating_point():
            torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_checkpoint_is_a_full_state_dict_that_cuts(runs):
    model, l0 = load_pruning_checkpoint(runs / "fsdp" / "latest-rank0.pt")
    assert l0.target.d_model == TARGET_D_MODEL and model.cfg.d_model == 96


def test_two_ranks_evaluate_and_reweight_as_one_process_on_the_same_global_batch(runs):
    """Every rank evaluates its share of the eval split and the losses are summed over ranks before the domains are
    re-weighted: a loss computed on rank 0's share alone would differ from the one-process run's. Without pruning
    (whose gate samples differ per rank) the two runs train the same model on the same global batches."""
    rows = {kind: read_metrics(runs / kind / "metrics.jsonl") for kind in ("plain", "single")}
    evals = {kind: [{k: v for k, v in r.items() if k.startswith("metrics/eval/")} for r in rows[kind]
                    if any(k.startswith("metrics/eval/") for k in r)] for kind in rows}
    assert len(evals["plain"]) == len(evals["single"]) == 2  # batches 2 and 4
    for two, one in zip(evals["plain"], evals["single"], strict=True):
        assert two.keys() == one.keys() and sum(any(d in k for d in DOMAINS) for k in one) >= len(DOMAINS)
        for key, value in one.items():
            assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    single = json.loads((runs / "single" / "proportions.json").read_text())["proportions"]
    assert probes(runs / "plain")[0]["proportions"] == pytest.approx(single, rel=1e-5)
