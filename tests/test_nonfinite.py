"""A run whose loss turns NaN stops with a clear message and exit 3; metrics.jsonl records NaN as "nan", not null."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import zipfile
from types import SimpleNamespace

import pytest
from recipe_fixtures import DOMAINS, tiny_recipe, write_mds
from script_modules import script

from llmshear import run as train
from llmshear.callbacks.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from llmshear.loggers import METRICS_FILE, JSONLinesLogger, read_metrics

LOSS = "loss/train/total"


def _state(batch: int, loss: float) -> SimpleNamespace:
    """What the guard reads at ``batch_end`` of the batch numbered ``batch`` in metrics.jsonl."""
    return SimpleNamespace(total_loss_dict={LOSS: loss}, timestamp=SimpleNamespace(batch=batch + 1))


def test_guard_stops_at_the_limit_of_consecutive_non_finite_batches_only():
    guard = NonFiniteLossGuard(3)
    states = [_state(batch, loss) for batch, loss in enumerate([2.0, math.nan, math.inf, 1.5, math.nan, -math.inf])]
    for state in states:  # two in a row, a finite loss resets the streak, two in a row again
        guard.batch_end(state, None)
    assert guard.streak == 2
    guard.batch_end(states[-1], None)  # the same loss dict again: a step the gradient scaler skipped, not counted
    assert guard.streak == 2 and guard.state_dict() == {"streak": 2}
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive batches \(4 to 6 in metrics.jsonl"):
        guard.batch_end(_state(6, math.nan), None)
    resumed = NonFiniteLossGuard(3)
    resumed.load_state_dict({"streak": 2})
    with pytest.raises(NonFiniteLossError):
        resumed.batch_end(_state(6, math.inf), None)
    with pytest.raises(ValueError, match="train.max_nonfinite"):
        NonFiniteLossGuard(0)


def test_metrics_file_writes_nan_and_inf_as_strings_and_reads_them_back(tmp_path):
    logger = JSONLinesLogger(tmp_path)
    logger.init(None, None)
    logger.log_metrics({"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.5}, step=4)
    logger.close(None, None)
    line = json.loads((tmp_path / METRICS_FILE).read_text())
    assert line == {"batch": 4, "a": "nan", "b": "inf", "c": "-inf", "d": 1.5}
    (row,) = read_metrics(tmp_path / METRICS_FILE)
    assert math.isnan(row["a"]) and row["b"] == math.inf and row["c"] == -math.inf and row["d"] == 1.5


def test_a_diverging_run_stops_with_exit_3_naming_the_batches_and_keeps_its_checkpoints(tmp_path, caplog):
    data = write_mds(tmp_path / "data", DOMAINS, 32, n_train=16, n_eval=2)
    recipe = tiny_recipe(tmp_path, data, prune=False, scheduler={"warmup": 0}, optimizer={"lr": 1e30},
                         train={"max_batches": 6, "eval_interval": 6, "max_nonfinite": 2},
                         checkpoint={"save_interval": 1})
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's own file")
    with caplog.at_level(logging.ERROR, logger="train"):
        assert train.main([str(recipe)]) == 3
    (message,) = [r.getMessage() for r in caplog.records if r.name == "train"]
    first, last = map(int, re.search(r"2 consecutive batches \((\d+) to (\d+) in metrics.jsonl", message).groups())
    losses = {row["batch"]: row[LOSS] for row in read_metrics(folder / METRICS_FILE) if LOSS in row}
    assert not any(math.isfinite(losses[b]) for b in (first, last)) and last == first + 1 == max(losses)
    assert all(math.isfinite(losses[b]) for b in range(first))
    raw = (folder / METRICS_FILE).read_text()
    assert f'"{LOSS}": null' not in raw and re.search(rf'"{LOSS}": "(nan|inf|-inf)"', raw)
    # every checkpoint written before the stop is there and complete; the user's file is untouched
    checkpoints = sorted(folder.glob("ep0-ba*-rank0.pt"))
    assert [p.name for p in checkpoints] == [f"ep0-ba{b}-rank0.pt" for b in range(1, last + 1)]
    assert all(zipfile.ZipFile(p).testzip() is None for p in checkpoints)
    assert hashlib.sha256((folder / "notes.txt").read_bytes()).hexdigest() == hashlib.sha256(
        b"the user's own file").hexdigest()


def test_plot_run_draws_a_run_with_nan_metrics(repo_root, tmp_path):
    plot_run = script("plot_run")
    run = tmp_path / "run"
    logger = JSONLinesLogger(run)
    logger.init(None, None)
    for batch, weight in enumerate([0.5, math.nan, math.inf, 0.25]):
        logger.log_metrics({"dynamic_loading/weight/alpha": weight}, step=batch)
    logger.close(None, None)
    curves, _ = plot_run.series([read_metrics(run / METRICS_FILE)], r"dynamic_loading/weight/(.+)")
    batches, values = curves["alpha"]
    assert batches == [0, 1, 2, 3] and values[0] == 0.5 and values[3] == 0.25
    assert math.isnan(values[1]) and math.isnan(values[2])  # drawn as gaps
    assert plot_run.main([str(run), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "domain_weights.png").stat().st_size > 0
