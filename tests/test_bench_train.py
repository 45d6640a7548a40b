"""scripts/bench_train.py end to end on a tiny model: both stages, both paths, the JSON report's keys (not speed)."""

from __future__ import annotations

import json

import torch
from script_modules import script


def test_bench_train_reports_both_stages_and_paths(capsys):
    argv = ["--preset", "tiny-gqa", "--steps", "2", "--warmup", "1", "--batch", "2", "--seq-len", "16",
            "--threads", str(torch.get_num_threads())]  # the script sets the thread count of this process
    assert script("bench_train").main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # stdout carries the JSON line alone (Composer's console log goes to stderr)
    result = json.loads(lines[0])
    assert result["preset"] == "tiny-gqa" and result["device"] == "cpu" and result["params"] > 0
    assert set(result["goals_met"]) == {"prune", "continue"}
    for stage in ("prune", "continue"):
        report = result[stage]
        assert report["ratio"] > 0 and isinstance(result["goals_met"][stage], bool)
        for path in ("bare", "composer"):
            assert report[path]["steps"] == 2
            assert report[path]["median_step_s"] > 0 and report[path]["tokens_per_s"] > 0
        assert report["composer"]["eval_s"] > 0
        assert report["composer"]["threads"] == torch.get_num_threads()
