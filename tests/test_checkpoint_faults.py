"""Faults around the run folder: kills inside checkpoint writes, a finished run started again, two runs in one
folder, checkpoints of the wrong kind or batch size, ``checkpoint.keep=0``. Each bad input is an exit status 2
with a message naming the key or file, without a traceback, and leaves the files already there as they were."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from recipe_fixtures import DOMAINS, assert_same_state, final_state, tiny_recipe, write_mds

from llmshear import run as train
from llmshear.checkpoints import CheckpointError, checkpoint_problem, describe
from llmshear.config import ConfigError, load
from llmshear.run_folder import LOCK_FILE, RunLock, recover

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"train": {"max_batches": 6, "eval_interval": 2}, "checkpoint": {"save_interval": 2}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def launch(recipe: Path, *args: str, stall: tuple[int, str] | None = None) -> subprocess.Popen:
    """``train.py recipe args`` (through the stalling worker when ``stall=(batch, mode)``), logging to ``.log``."""
    log = open(recipe.with_suffix(".log"), "a")  # noqa: SIM115 (the child owns it)
    command = [str(REPO / "train.py")]
    if stall is not None:
        command = [str(REPO / "tests" / "stall_worker.py"), str(stall[0]), stall[1], str(marker(recipe))]
    return subprocess.Popen([sys.executable, *command, str(recipe), *args], stdout=log, stderr=subprocess.STDOUT,
                            env=ENV, cwd=REPO)


def marker(recipe: Path) -> Path:
    return recipe.with_suffix(".stalled")


def kill_when_stalled(process: subprocess.Popen, recipe: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not marker(recipe).exists():
        assert process.poll() is None, recipe.with_suffix(".log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the checkpoint write never stalled"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    marker(recipe).unlink()


def run_main(caplog, recipe: Path, *args: str) -> tuple[int, str]:
    """``train.py recipe args`` in this process (a bad input must come back as a status, not an exception)."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = train.main([str(recipe), *args])
    return status, caplog.text


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """An uninterrupted 6-batch pruning run (checkpoints at 2, 4, 6) and its data."""
    tmp = tmp_path_factory.mktemp("faults")
    data = write_mds(tmp / "data", DOMAINS, 32, n_train=8)
    recipe = tiny_recipe(tmp, data, run="straight", **SETTINGS)
    assert launch(recipe).wait(timeout=300) == 0, recipe.with_suffix(".log").read_text()[-3000:]
    return {"tmp": tmp, "data": data, "recipe": recipe, "folder": tmp / "straight"}


def test_kills_inside_checkpoint_writes_resume_bit_identical(straight):
    """Killed with an empty, a half-written and a complete-but-unlinked checkpoint; each restart recovers alone."""
    tmp = straight["tmp"]
    recipe = tiny_recipe(tmp, straight["data"], run="killed", **SETTINGS)
    folder = tmp / "killed"
    resume = "checkpoint.autoresume=true"
    kill_when_stalled(launch(recipe, stall=(2, "partial")), recipe)  # the first checkpoint half-written
    assert 0 < (folder / "ep0-ba2-rank0.pt").stat().st_size and not (folder / "latest-rank0.pt").exists()
    kill_when_stalled(launch(recipe, resume, stall=(4, "complete")), recipe)  # written, latest not yet moved
    assert (folder / "latest-rank0.pt").resolve().name == "ep0-ba2-rank0.pt"
    assert checkpoint_problem(folder / "ep0-ba4-rank0.pt") is None
    kill_when_stalled(launch(recipe, resume, stall=(6, "empty")), recipe)  # the last one created, still empty
    assert (folder / "ep0-ba6-rank0.pt").stat().st_size == 0
    assert launch(recipe, resume, "checkpoint.keep=2").wait(timeout=300) == 0, \
        recipe.with_suffix(".log").read_text()[-3000:]

    log = recipe.with_suffix(".log").read_text()
    assert "ep0-ba2-rank0.pt set aside" in log and "ep0-ba6-rank0.pt set aside" in log
    assert "now points to ep0-ba4-rank0.pt" in log and "Traceback" not in log
    assert sorted(p.name for p in (folder / "incomplete").iterdir()) == ["ep0-ba2-rank0.pt", "ep0-ba6-rank0.pt"]
    assert (folder / "incomplete" / "ep0-ba6-rank0.pt").stat().st_size == 0  # set aside as it was, not deleted
    assert_same_state(final_state(straight["folder"]), final_state(folder))
    # keep=2 counts the checkpoint written before the resume (ba2, by the second run): it went at ba6.
    assert sorted(p.name for p in folder.glob("ep*")) == ["ep0-ba4-rank0.pt", "ep0-ba6-rank0.pt"]
    # The logs and masks read as one run: what the killed runs wrote after their last checkpoint is set aside.
    ours = (folder / "metrics.jsonl").read_text().splitlines()
    theirs = (straight["folder"] / "metrics.jsonl").read_text().splitlines()
    extra = [line for line in ours if line not in theirs]  # the resumed run logs the proportions it starts with
    assert len(extra) == 1 and extra[0].startswith('{"batch": 4, "dynamic_loading/weight/alpha"'), extra
    assert [line for line in ours if line not in extra] == theirs  # no line twice, none missing, same order
    assert (folder / "metrics.superseded.jsonl").stat().st_size > 0
    assert not (straight["folder"] / "metrics.superseded.jsonl").exists()  # nothing to set aside in a fresh run
    masks = sorted(p.name for p in (folder / "masks").glob("*.*"))
    assert masks == sorted(p.name for p in (straight["folder"] / "masks").glob("*.*"))
    assert {p.name for p in (folder / "masks" / "superseded").iterdir()} >= {"ba6.pt", "ba6.json"}
    assert not (folder / LOCK_FILE).exists()


def test_a_finished_run_started_again_is_complete(straight, caplog):
    before = hashes(straight["folder"])
    status, text = run_main(caplog, straight["recipe"], "checkpoint.autoresume=true")
    assert status == 0, text
    assert "is complete: its latest checkpoint is batch 6 of train.max_batches=6" in text
    assert hashes(straight["folder"]) == before


def test_a_run_folder_resumed_at_another_path_continues_its_metrics(straight, tmp_path, caplog):
    """A run folder moved (or fetched from ``checkpoint.remote`` on a machine with another save_folder path) resumes
    as the same run: ``metrics.jsonl`` continues instead of being set aside as another run's."""
    moved = tmp_path / "moved"
    shutil.copytree(straight["folder"], moved, symlinks=True)
    before = (moved / "metrics.jsonl").read_text()
    status, text = run_main(caplog, straight["recipe"], "checkpoint.autoresume=true", "train.max_batches=8",
                            f"checkpoint.save_folder={moved}")
    assert status == 0, text
    after = (moved / "metrics.jsonl").read_text()
    superseded = (moved / "metrics.superseded.jsonl").read_text()  # logged after the batch-6 checkpoint, logged again
    assert before.endswith(superseded) and after.startswith(before[:len(before) - len(superseded)])
    assert {json.loads(line)["batch"] for line in superseded.splitlines()} == {6}
    assert (moved / "ep0-ba8-rank0.pt").is_file()


def test_a_second_run_in_a_locked_folder_refuses(straight, caplog):
    folder = straight["folder"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = RunLock(folder)
        lock.holder["pid"] = holder.pid
        lock.acquire()
        before = hashes(folder)
        status, text = run_main(caplog, straight["recipe"], "checkpoint.autoresume=true", "train.max_batches=8")
        assert status == 2
        assert f"lock file {folder / LOCK_FILE}" in text and f"pid {holder.pid}" in text
        assert hashes(folder) == before
    finally:
        holder.kill()
        holder.wait()
    (folder / LOCK_FILE).unlink()


def test_a_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = RunLock(tmp_path)
    stale.holder["pid"] = int(gone.stdout)
    stale.acquire()
    mine = RunLock(tmp_path)
    mine.acquire()
    assert "taking over the lock" in caplog.text
    other = RunLock(tmp_path)
    with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
        other.acquire()
    mine.release()
    assert not (tmp_path / LOCK_FILE).exists()


def problems_of(recipe: Path, overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(recipe, overrides)
    return info.value.problems


def test_keep_zero_is_refused(straight):
    problems = problems_of(straight["recipe"], ["checkpoint.keep=0", "checkpoint.autoresume=true"])
    assert any("checkpoint.keep=0 " in p and "delete each checkpoint" in p for p in problems), problems
    problems_of(straight["recipe"], ["checkpoint.keep=-2", "checkpoint.autoresume=true"])
    load(straight["recipe"], ["checkpoint.keep=1", "checkpoint.autoresume=true"])


def test_resume_with_another_batch_size_or_kind_is_a_config_error(straight, tmp_path, caplog):
    folder = straight["folder"]
    before = hashes(folder)
    status, text = run_main(caplog, straight["recipe"], "checkpoint.autoresume=true", "train.global_batch_size=8",
                            "train.max_batches=8")
    assert status == 2
    assert "train.global_batch_size=8 differs from 4 in" in text and "ep0-ba6-rank0.pt" in text
    assert hashes(folder) == before

    pruning = folder / "ep0-ba6-rank0.pt"
    assert describe(pruning).kind == "pruning"
    plain = tiny_recipe(tmp_path, straight["data"], run="plain", prune=False)
    problems = problems_of(plain, [f"checkpoint.load_path={pruning}"])
    assert any("checkpoint.load_path:" in p and "is a pruning checkpoint" in p and "needs a continued" in p
               for p in problems), problems
    continued = tmp_path / "continued.pt"
    torch.save({"state": {"model": {"model.lm_head.weight": torch.zeros(2)}}}, continued)
    problems = problems_of(straight["recipe"], [f"checkpoint.load_path={continued}"])
    assert any("is a continued checkpoint" in p and "needs a pruning" in p for p in problems), problems


def test_validation_reads_the_zip_directory_only(tmp_path):
    """A flipped byte inside a tensor is not looked for (that would read every byte); a cut file is found."""
    path = tmp_path / "ep0-ba2-rank0.pt"
    torch.save({"state": {"model": {"w": torch.arange(4096.0)}}}, path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    assert checkpoint_problem(path) is None
    path.write_bytes(bytes(data[:middle]))
    assert "truncated or corrupt" in checkpoint_problem(path)
    assert recover(tmp_path) is None and (tmp_path / "incomplete" / path.name).read_bytes() == bytes(data[:middle])


def test_distill_on_meta_and_sharded_without_fsdp2_are_config_errors(straight, tmp_path):
    recipe = tiny_recipe(tmp_path, straight["data"], run="fresh", distill={"teacher": "tiny-gqa"},
                         model={"init_device": "meta"}, fsdp={"enabled": True}, pruning={"init": "constant"})
    problems = problems_of(recipe, [])
    assert any("distill" in p and "model.init_device='meta'" in p for p in problems), problems
    problems = problems_of(tiny_recipe(tmp_path, straight["data"], run="fresh"), ["fsdp.state_dict_type=sharded"])
    assert any("fsdp.state_dict_type='sharded' needs fsdp.enabled=true" in p for p in problems), problems
    problems = problems_of(straight["recipe"], ["checkpoint.autoresume=true", "fsdp.enabled=true",
                                                "fsdp.state_dict_type=sharded"])
    assert any("is a full checkpoint, but this run reads sharded ones" in p for p in problems), problems
    assert not (tmp_path / "fresh").exists()


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_the_resume_is_exact(straight, tmp_path, caplog,
                                                                                     monkeypatch):
    from composer.utils import checkpoint as composer_checkpoint

    write = composer_checkpoint._write_checkpoint_file

    def full_at_batch_4(state_dict, filename):
        if "ba4" not in filename:
            return write(state_dict, filename)
        Path(filename).write_bytes(b"PK\x03\x04 half a zip")  # what torch leaves when the disk fills mid-file
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/12: file write failed")

    recipe = tiny_recipe(tmp_path, straight["data"], run="full", **SETTINGS)
    monkeypatch.setattr(composer_checkpoint, "_write_checkpoint_file", full_at_batch_4)
    status, text = run_main(caplog, recipe)
    assert status == 2 and "Traceback" not in text
    assert re.search(rf"{tmp_path / 'full'}: writing the run folder \(a checkpoint, metrics or masks\) failed: torch "
                     r"could not write the file \(a full disk or quota, most often\); [\d.]+ GB free there now\. "
                     r"Nothing complete was deleted", text), text
    assert (tmp_path / "full" / "ep0-ba2-rank0.pt").is_file() and not (tmp_path / "full" / LOCK_FILE).exists()
    monkeypatch.setattr(composer_checkpoint, "_write_checkpoint_file", write)  # space freed
    status, text = run_main(caplog, recipe, "checkpoint.autoresume=true")
    assert status == 0, text
    assert_same_state(final_state(straight["folder"]), final_state(tmp_path / "full"))
