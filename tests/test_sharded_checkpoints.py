"""``composer -n 2`` (gloo, FSDP2) with sharded checkpoints: every rank writes and reads only its own shard; a run
killed inside a checkpoint write (every shard written, ``.metadata`` not yet) resumes by itself and ends
bit-identical to an uninterrupted run; ``scripts/export_hf.py``'s reader cuts the sharded checkpoint; a source
initialised on rank 0 only trains exactly like one every rank loads; ``checkpoint.remote`` (moto's S3 server):
every rank uploads its shard in the background, a run killed during an upload resumes from the bucket into an
empty folder bit-identical; ranks wait for each other's long transfers without a collective timeout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from recipe_fixtures import DOMAINS, bucket_names, tiny_recipe, write_mds

from llmshear.checkpoints import METADATA_FILE, describe, load_checkpoint
from llmshear.tools.export import load_pruning_checkpoint

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"train": {"max_batches": 6, "eval_interval": 2}, "checkpoint": {"save_interval": 2},
            "fsdp": {"enabled": True, "state_dict_type": "sharded"}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def launch(recipe: Path, *args: str, stall: int | None = None, mode: str = "sharded",
           env: dict | None = None) -> subprocess.Popen:
    """``composer -n 2 train.py recipe args`` in its own process group (a kill takes every rank); with ``stall``,
    through ``tests/stall_worker.py`` (``mode``)."""
    script = [str(REPO / "train.py")] if stall is None else \
        [str(REPO / "tests" / "stall_worker.py"), str(stall), mode, str(recipe.with_suffix(".stalled"))]
    log = open(recipe.with_suffix(".log"), "a")  # noqa: SIM115 (the child owns it)
    launcher = Path(sys.executable).parent / "composer"
    return subprocess.Popen([str(launcher), "-n", "2", "--stderr", str(recipe.parent / f"{recipe.stem}{{rank}}.err"),
                             *script, str(recipe), *args], stdout=log, stderr=subprocess.STDOUT, env=env or ENV,
                            cwd=REPO, start_new_session=True)


def everything(path: Path) -> dict:
    checkpoint = load_checkpoint(path)
    state = checkpoint["state"]
    return {"model": state["model"], "optimizer": state["optimizers"], "data": state["dataset_state"],
            "rng": checkpoint["rng"]}


def assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_sharded_checkpoint_killed_inside_a_write_resumes_bit_identical(tmp_path):
    data = write_mds(tmp_path / "data", DOMAINS, 32, n_train=8)
    straight = tiny_recipe(tmp_path, data, run="straight", **SETTINGS)
    killed = tiny_recipe(tmp_path, data, run="killed", **SETTINGS)
    reference, victim = launch(straight), launch(killed, stall=4)
    deadline = time.monotonic() + 400
    while not killed.with_suffix(".stalled").exists():
        assert victim.poll() is None, killed.with_suffix(".log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the sharded checkpoint write never stalled"
        time.sleep(0.1)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    folder = tmp_path / "killed"
    assert sorted(p.name for p in (folder / "ep0-ba4").iterdir()) == ["__0_0.distcp", "__1_0.distcp"]
    assert (folder / "latest-rank0.pt").resolve().name == "ep0-ba2"

    resumed = launch(killed, "checkpoint.autoresume=true")
    assert resumed.wait(timeout=400) == 0, killed.with_suffix(".log").read_text()[-3000:]
    assert reference.wait(timeout=400) == 0, straight.with_suffix(".log").read_text()[-3000:]
    log = killed.with_suffix(".log").read_text()
    assert "ep0-ba4 set aside" in log and "Traceback" not in log
    assert (folder / "incomplete" / "ep0-ba4" / "__1_0.distcp").is_file()  # set aside whole, not deleted

    final = tmp_path / "straight" / "ep0-ba6"
    shards = [final / f"__{rank}_0.distcp" for rank in (0, 1)]
    total = sum(p.stat().st_size for p in shards)
    assert all(0 < p.stat().st_size < 0.7 * total for p in shards)  # each rank wrote its part, not the whole
    assert (final / METADATA_FILE).is_file()
    assert_identical(everything(final), everything(folder / "ep0-ba6"))
    info = describe(folder / "latest-rank0.pt")
    assert (info.kind, info.batch, info.data["global_batch_size"]) == ("pruning", 6, 4)
    model, l0 = load_pruning_checkpoint(folder / "latest-rank0.pt")
    assert model.cfg.d_model == 96 and l0.target.d_model == 64 and l0.is_hardened()


def test_continued_run_with_the_source_on_rank_0_only_trains_like_every_rank_loading_it(tmp_path):
    """``model.init_device=meta`` (the continue recipes): only rank 0 reads the source, FSDP2 broadcasts it."""
    data = write_mds(tmp_path / "data", DOMAINS, 32, n_train=8)
    settings = {**SETTINGS, "train": {"max_batches": 2, "eval_interval": 2}}
    recipes = {device: tiny_recipe(tmp_path, data, run=device, prune=False,
                                   model={"pretrained": "tiny-gqa", "init_device": device}, **settings)
               for device in ("cpu", "meta")}
    runs = {device: launch(recipe) for device, recipe in recipes.items()}
    for device, run in runs.items():
        assert run.wait(timeout=400) == 0, recipes[device].with_suffix(".log").read_text()[-3000:]
    cpu, meta = (load_checkpoint(tmp_path / device / "ep0-ba2", keys={"state.model"}) for device in ("cpu", "meta"))
    assert_identical(cpu["state"]["model"], meta["state"]["model"])


def test_sharded_run_killed_during_an_upload_resumes_from_the_bucket_bit_identical(tmp_path, s3):
    client, env = s3
    env = {**ENV, **env}
    data = write_mds(tmp_path / "data", DOMAINS, 32, n_train=8)
    straight = tiny_recipe(tmp_path, data, run="straight", **SETTINGS)
    mirrored = tiny_recipe(tmp_path, data, run="mirrored", **{**SETTINGS, "checkpoint": {
        **SETTINGS["checkpoint"], "remote": "s3://bucket/run"}})
    reference, victim = launch(straight), launch(mirrored, stall=4, mode="upload", env=env)
    folder = tmp_path / "mirrored"
    deadline = time.monotonic() + 400
    while not (folder / "ep0-ba6" / METADATA_FILE).is_file():  # training goes on while rank 1's upload stalls
        assert victim.poll() is None, mirrored.with_suffix(".log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach its checkpoint at batch 6"
        time.sleep(0.2)
    assert mirrored.with_suffix(".stalled").exists()
    time.sleep(2)  # rank 0's uploads of batch 6 (no upload waits for another rank's)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    stored = bucket_names(client, "run/")
    assert {"ep0-ba2/__0_0.distcp", "ep0-ba2/__1_0.distcp", "ep0-ba2/.metadata", "ep0-ba4/__0_0.distcp",
            "ep0-ba4/.metadata", "metrics.jsonl"} <= set(stored)
    assert "ep0-ba4/__1_0.distcp" not in stored  # stalled when killed
    assert stored.get("latest", b"ep0-ba2\n") == b"ep0-ba2\n"  # never a checkpoint missing a shard
    assert not [name for name in stored if name.startswith(".") or "/." in name.replace("/.metadata", "")]

    shutil.rmtree(folder)  # a fresh machine: the run folder is gone
    resumed = launch(mirrored, "checkpoint.autoresume=true", env=env)
    assert resumed.wait(timeout=400) == 0, mirrored.with_suffix(".log").read_text()[-3000:]
    assert reference.wait(timeout=400) == 0, straight.with_suffix(".log").read_text()[-3000:]
    # each rank downloaded its own shard, rank 0 with .metadata and the other files
    assert "downloaded s3://bucket/run/ep0-ba2 (2 file(s))" in mirrored.with_suffix(".log").read_text()
    assert "downloaded s3://bucket/run/ep0-ba2 (1 file(s))" in (tmp_path / "mirrored1.err").read_text()
    assert_identical(everything(tmp_path / "straight" / "ep0-ba6"), everything(folder / "ep0-ba6"))
    stored = bucket_names(client, "run/")
    assert stored["latest"] == b"ep0-ba6\n"
    for name in ("__0_0.distcp", "__1_0.distcp", METADATA_FILE):
        assert stored[f"ep0-ba6/{name}"] == (folder / "ep0-ba6" / name).read_bytes(), name
    assert not list(folder.glob(".uploading-rank*"))


def test_ranks_wait_for_a_transfer_longer_than_the_collective_timeout(tmp_path):
    """Rank 1's work outlasts the process group's 3 s timeout; both ranks return, with the same problems."""
    launcher = Path(sys.executable).parent / "composer"
    done = subprocess.run([str(launcher), "-n", "2", str(REPO / "tests" / "together_worker.py"), str(tmp_path)],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["slow"] == []
        assert result["failed"] == ["rank 1: no space left on the store"]
        assert result["slow_s"] > 4
