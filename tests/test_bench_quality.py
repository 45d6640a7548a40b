"""scripts/bench_quality.py on a tiny source and tiny data: every arm runs, the JSON line and table have their shape."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from data_fixtures import REPO
from recipe_fixtures import DOMAINS, write_mds

TARGET = {"d_model": 96, "n_layers": 3, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 256}
BUDGET = 0.05  # 1-2 batches a stage
ARMS = ["ours", "constant", "distill", "random", "importance", "scratch"]


def _script():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "scripts" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _script()


def _argv(out, data, *extra):
    return ["--out", str(out), "--data", str(data), "--source", "tiny-smollm2", "--target", json.dumps(TARGET),
            *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mds(tmp_path_factory.mktemp("data"), DOMAINS, seq_len=32, n_train=32, n_eval=4)


def test_every_arm_runs_and_reports_the_same_budget(tmp_path, data, capsys):
    out = tmp_path / "bench"
    assert bench.main(_argv(out, data, "--budget", str(BUDGET))) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(line["arms"]) == ARMS
    batches = [max(1, round(n * BUDGET)) for n in (bench.PRUNE_BATCHES, bench.CONTINUE_BATCHES)]
    assert [line["prune_batches"], line["continue_batches"]] == batches and line["batch_tokens"] == 4 * 32
    for name, arm in line["arms"].items():
        assert set(arm["ppl"]) == set(DOMAINS) and arm["mean_ppl"] > 0 and arm["wall_s"] > 0, name
        assert arm["worst_domain"] in DOMAINS and arm["params"] == line["arms"]["ours"]["params"]
    assert line["reference"]["worst_gap"] == 0 and line["reference"]["params"] > line["arms"]["ours"]["params"]
    results = [json.loads((out / name / "result.json").read_text()) for name in ARMS]
    assert {r["train_tokens"] for r in results} == {sum(batches) * 4 * 32}  # prune + continue, every arm alike
    assert results[2]["stages_s"]["prune"] == results[0]["stages_s"]["prune"]  # distill reuses ours' pruning run
    table = (out / "results.md").read_text().splitlines()
    assert table[0].split("|")[2:5] == [f" {d} " for d in DOMAINS] and len(table) >= 2 + 1 + len(ARMS)
    for name in ("ours", "constant"):
        assert (out / name / "prune.yaml").is_file() and (out / name / "pruned" / "config.json").is_file()
    assert "distill:" in (out / "distill" / "continue.yaml").read_text()
    assert "update: constant" in (out / "constant" / "continue.yaml").read_text()

    stamps = {name: (out / name / "result.json").stat().st_mtime_ns for name in ARMS}
    assert bench.main(_argv(out, data, "--budget", str(BUDGET))) == 0  # resumed: every arm is skipped
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arms"] == line["arms"]
    assert {name: (out / name / "result.json").stat().st_mtime_ns for name in ARMS} == stamps
    with pytest.raises(SystemExit) as exit_info:  # the finished arms had another budget: refused, not mixed
        bench.main(_argv(out, data, "--budget", "0.08"))
    assert exit_info.value.code == 2 and "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0"], "--budget must be positive"),
    (["--target", json.dumps({**TARGET, "n_layers": 9})], "n_layers=9 is larger"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, data, capsys, extra, message):
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(_argv(out, data, *extra))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_missing_data_fails_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(_argv(tmp_path / "bench", tmp_path / "nowhere"))
    assert exit_info.value.code == 2 and "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()
