"""A pruning run killed (SIGKILL) after a checkpoint and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from recipe_fixtures import DOMAINS, assert_same_state, final_state, tiny_recipe, write_mds

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"train": {"max_batches": 6, "eval_interval": 2, "log_interval": 1}, "checkpoint": {"save_interval": 2},
            "pruning": {"sparsity_warmup": 0.15}}  # the ramp ends at batch 1: usage recorded before the kill
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(recipe: Path, *overrides: str) -> subprocess.Popen:
    log = open(recipe.with_suffix(".log"), "a")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), str(recipe), *overrides], stdout=log,
                            stderr=subprocess.STDOUT, env=ENV, cwd=REPO)


def kill_after_first_checkpoint(process: subprocess.Popen, folder: Path, timeout: float = 240) -> None:
    """SIGKILL the run as soon as its first checkpoint is complete (Composer links ``latest`` after writing)."""
    deadline = time.monotonic() + timeout
    while not (folder / "latest-rank0.pt").exists():
        assert process.poll() is None, f"the run ended before its first checkpoint (exit {process.returncode})"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


LAYER_LOSS = {"layer_choice": "loss", "temperature": 2.0, "final_temperature": 2.0,
              "layer_final_temperature": 2.0}  # warm: every gate undecided


@pytest.mark.parametrize("pruning", [{"constraint": "exact"},
                                     {"constraint": "row"},  # Lagrange multipliers mid-ascent restored too
                                     {"constraint": "exact", **LAYER_LOSS}],  # layer cuts compared after the resume
                         ids=["exact", "row", "layer-loss"])
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, pruning):
    data = write_mds(tmp_path / "data", DOMAINS, 32, n_train=8)  # 8 per domain: domains start new passes
    settings = {**SETTINGS, "pruning": {**SETTINGS["pruning"], **pruning}}
    straight = tiny_recipe(tmp_path, data, run="straight", **settings)
    killed = tiny_recipe(tmp_path, data, run="killed", **settings)
    reference = start(straight)
    victim = start(killed)
    kill_after_first_checkpoint(victim, tmp_path / "killed")
    assert not (tmp_path / "killed" / "ep0-ba6-rank0.pt").exists()
    assert start(killed, "checkpoint.autoresume=true").wait(timeout=300) == 0, (tmp_path / "killed.log").read_text()
    assert reference.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()
    assert (tmp_path / "killed.log").read_text().count("[batch=1/6]") == 1  # the second start resumed

    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert_same_state(a, b)
    for name in ("l0.log_alpha.layer", "l0.shift_kv_group", "l0.hard_intermediate", "l0.usage_hidden"):
        assert name in a["model"]
    assert a["model"]["l0.hardened"].item()  # hardened at batch 4, after the resume: the same masks either way
    assert a["model"]["l0.usage_batches"].item() == 3  # batches 1-3, across the kill at batch 2
    if pruning["constraint"] == "row":
        assert a["model"]["l0.lagrangian.lambda1.layer"].abs().sum() > 0
    if "layer_choice" in pruning:
        for run in ("straight", "killed"):
            assert (tmp_path / f"{run}.log").read_text().count("batch 4: 4 layer cuts compared") == 1
    assert a["data"]["train"]["proportions"] != [0.5, 0.3, 0.2]  # re-weighting happened
    assert a["data"]["train"]["passes"] != [0, 0, 0]
