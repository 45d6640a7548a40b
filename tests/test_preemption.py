"""SIGTERM / SIGUSR1 in the middle of a run: a checkpoint at the batch reached, exit status 75, and a resume that
ends bit-identical to an uninterrupted run (one process, and two ranks of which only one gets the signal, mirrored
to S3 and resumed from there)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from composer.core import Event, State
from composer.devices import DeviceCPU
from composer.loggers import Logger
from recipe_fixtures import DOMAINS, assert_same_state, bucket_names, final_state, tiny_recipe, write_mds

from llmshear.callbacks.preemption import Preempted, PreemptionStop, save_schedule
from llmshear.models.build import build_model
from llmshear.models.composer_llama import ComposerLlama
from llmshear.models.hf import load_config
from llmshear.run_folder import LOCK_FILE
from llmshear.slurm import PREEMPTED_STATUS

REPO = Path(__file__).resolve().parents[1]
BATCHES = 24
SETTINGS = {"train": {"max_batches": BATCHES, "eval_interval": 8, "log_interval": 1},
            "checkpoint": {"save_interval": 0}}  # no periodic checkpoint: only the signal's and the last
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
LAUNCHER = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "composer"


def _state(max_batches: int = 10) -> State:
    model = ComposerLlama(build_model(load_config("tiny-gqa"), seed=0))
    return State(model=model, rank_zero_seed=0, run_name="t", device=DeviceCPU(), max_duration=f"{max_batches}ba")


def _at_batch(state: State, batch: int) -> None:
    state.timestamp = state.timestamp.copy(batch=state.timestamp.batch.from_input(f"{batch}ba"))


def test_a_signal_stops_at_the_batch_end_with_a_checkpoint_and_spares_the_last_batch():
    state, stop = _state(), PreemptionStop(max_batches=10)
    logger = Logger(state, [])
    before = signal.getsignal(signal.SIGUSR1)
    stop.fit_start(state, logger)
    try:
        _at_batch(state, 4)
        stop.batch_end(state, logger)
        assert not stop.stopping and not stop.should_save(state, Event.BATCH_CHECKPOINT)
        os.kill(os.getpid(), signal.SIGUSR1)  # noted, not fatal: the batch goes on
        stop.batch_end(state, logger)
        assert stop.stopping and stop.received == signal.SIGUSR1
        assert stop.should_save(state, Event.BATCH_CHECKPOINT) and not stop.should_save(state, Event.EPOCH_CHECKPOINT)
        due = save_schedule("100ba", stop)
        assert due(state, Event.BATCH_CHECKPOINT)
        with pytest.raises(Preempted, match="SIGUSR1 with a checkpoint at batch 4"):
            stop.batch_checkpoint(state, logger)
        _at_batch(state, 10)
        stop.batch_checkpoint(state, logger)  # the last batch: the run completes instead
    finally:
        stop.fit_end(state, logger)
    assert signal.getsignal(signal.SIGUSR1) is before


LATE_SIGNAL = """
import os, signal, sys
from types import SimpleNamespace
from llmshear.callbacks.preemption import Preempted, PreemptionStop
stop, state = PreemptionStop(max_batches=10), SimpleNamespace(timestamp=SimpleNamespace(batch=4))
stop.fit_start(state, None)
os.kill(os.getpid(), signal.SIGTERM)
stop.batch_end(state, None)
try:
    stop.batch_checkpoint(state, None)
except Preempted:
    pass
class Late:
    def __del__(self, kill=os.kill, pid=os.getpid(), signum=signal.SIGTERM):  # run after the modules are gone
        kill(pid, signum)
late = Late()
sys.exit(75)
"""


def test_a_second_sigterm_while_the_stopped_process_shuts_down_leaves_its_status_75():
    """The launcher signals the ranks still alive once one has exited; one may be past its handlers' lifetime."""
    child = subprocess.run([sys.executable, "-c", LATE_SIGNAL], env=ENV, cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == PREEMPTED_STATUS, child.stderr[-2000:]


def _batch_reached(log: Path) -> int:
    found = re.findall(r"\[batch=(\d+)/", log.read_text()) if log.exists() else []
    return int(found[-1]) if found else 0


def _signal_at(process: subprocess.Popen, log: Path, batch: int, pid: int | None = None, timeout: float = 300) -> None:
    """Send SIGTERM to ``pid`` (default: the process) once ``log`` shows ``batch``."""
    deadline = time.monotonic() + timeout
    while _batch_reached(log) < batch:
        assert process.poll() is None, f"the run ended before batch {batch} (exit {process.returncode})"
        assert time.monotonic() < deadline, f"batch {batch} not reached"
        time.sleep(0.05)
    os.kill(pid or process.pid, signal.SIGTERM)


def _stopped_batch(folder: Path) -> int:
    batch = int(re.fullmatch(r"ep0-ba(\d+)-rank0\.pt", os.readlink(folder / "latest-rank0.pt")).group(1))
    assert 3 <= batch < BATCHES
    return batch


def test_sigterm_checkpoints_the_batch_reached_and_the_resume_equals_an_uninterrupted_run(tmp_path):
    data = write_mds(tmp_path / "data", DOMAINS, 32, n_train=8)
    straight, stopped = (tiny_recipe(tmp_path, data, run=run, **SETTINGS) for run in ("straight", "stopped"))
    logs = {run: open(tmp_path / f"{run}.log", "a") for run in ("straight", "stopped")}  # noqa: SIM115

    def train(recipe: Path, *overrides: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(REPO / "train.py"), str(recipe), *overrides], env=ENV, cwd=REPO,
                                stdout=logs[recipe.stem], stderr=subprocess.STDOUT)

    reference, victim = train(straight), train(stopped)
    _signal_at(victim, tmp_path / "stopped.log", 3)
    assert victim.wait(timeout=300) == PREEMPTED_STATUS, (tmp_path / "stopped.log").read_text()[-3000:]
    batch = _stopped_batch(tmp_path / "stopped")
    text = (tmp_path / "stopped.log").read_text()
    assert "SIGTERM received; writing a checkpoint at this batch" in text and "Traceback" not in text
    assert not (tmp_path / "stopped" / LOCK_FILE).exists()  # released: the requeued job starts at once
    assert train(stopped, "checkpoint.autoresume=true").wait(timeout=300) == 0, (tmp_path / "stopped.log").read_text()
    assert reference.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()
    assert_same_state(final_state(tmp_path / "straight", BATCHES), final_state(tmp_path / "stopped", BATCHES))
    resumed = (tmp_path / "stopped.log").read_text()[len(text):]
    assert f"[batch={batch + 1}/" in resumed and f"[batch={batch}/" not in resumed  # it went on from the checkpoint


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children():
            try:
                if child.environ().get("RANK") == str(rank):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} did not start")


def test_a_signal_on_one_rank_stops_both_at_the_same_batch_and_the_resume_is_exact(tmp_path, s3):
    """The stopped run mirrors to ``checkpoint.remote``; the requeued job runs on a machine without its folder."""
    client, env = s3
    data = write_mds(tmp_path / "data", DOMAINS, 32, n_train=8)
    recipes = {"straight": tiny_recipe(tmp_path, data, run="straight", **SETTINGS),
               "stopped": tiny_recipe(tmp_path, data, run="stopped", **{**SETTINGS, "checkpoint": {
                   **SETTINGS["checkpoint"], "remote": "s3://bucket/stopped"}})}

    def launch(run: str, *overrides: str) -> subprocess.Popen:
        log = open(tmp_path / f"{run}.log", "a")  # noqa: SIM115 (the child owns it)
        return subprocess.Popen([str(LAUNCHER), "-n", "2", "--stderr", str(tmp_path / f"{run}-rank{{rank}}.err"),
                                 str(REPO / "train.py"), str(recipes[run]), *overrides], env={**ENV, **env},
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    reference, victim = launch("straight"), launch("stopped")
    _signal_at(victim, tmp_path / "stopped.log", 3, pid=_rank_pid(victim, 1))
    assert victim.wait(timeout=300) == PREEMPTED_STATUS, (tmp_path / "stopped-rank1.err").read_text()[-3000:]
    batch = _stopped_batch(tmp_path / "stopped")
    assert "SIGTERM received" in (tmp_path / "stopped.log").read_text()  # rank 0 heard of it through the flag
    stored = bucket_names(client, "stopped/")
    assert stored["latest"] == f"ep0-ba{batch}-rank0.pt\n".encode()  # mirrored before the exit
    assert stored[f"ep0-ba{batch}-rank0.pt"] == (tmp_path / "stopped" / f"ep0-ba{batch}-rank0.pt").read_bytes()
    shutil.rmtree(tmp_path / "stopped")  # requeued on another node
    assert launch("stopped", "checkpoint.autoresume=true").wait(timeout=300) == 0, (
        (tmp_path / "stopped-rank1.err").read_text()[-3000:])
    assert reference.wait(timeout=300) == 0, (tmp_path / "straight-rank1.err").read_text()[-3000:]
    assert_same_state(final_state(tmp_path / "straight", BATCHES), final_state(tmp_path / "stopped", BATCHES))
