"""scripts/bench_quality.py on a tiny source and tiny data: arms at two seeds, the held-out test split, the start
models' evaluation, the cut report, the JSON line and tables; bad arguments refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from recipe_fixtures import DOMAINS, write_mds
from script_modules import script

from llmshear.datasets.mds import MDSDomain

TARGET = {"d_model": 96, "n_layers": 3, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 256}
BUDGET, PRUNE_BUDGET = 0.05, 0.5  # 1 pruning batch, 2 continue batches
ARMS = "ours,importance,importance@18,distill@18"
KEYS = ["ours", "importance", "importance@18", "distill@18"]
EVAL, TEST = 2, 4  # held-out sequences per domain after the split


bench = script("bench_quality")


def _argv(out, data, *extra):
    return ["--out", str(out), "--data", str(data), "--source", "tiny-smollm2", "--target", json.dumps(TARGET),
            *extra]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return write_mds(tmp_path_factory.mktemp("full"), DOMAINS, seq_len=32, n_train=32, n_eval=EVAL + TEST)


@pytest.fixture(scope="module")
def data(tmp_path_factory, full):
    out = tmp_path_factory.mktemp("split") / "data"
    assert bench.split_eval(full, out, EVAL) == {d: {"eval": EVAL, "test": TEST} for d in DOMAINS}
    return out


def test_split_eval_keeps_the_first_sequences_for_eval_and_the_rest_for_test(full, data):
    for domain in DOMAINS:
        rows = MDSDomain(full / "eval" / domain)
        parts = {split: MDSDomain(data / split / domain) for split in ("train", "eval", "test")}
        assert [len(p) for p in parts.values()] == [len(MDSDomain(full / "train" / domain)), EVAL, TEST]
        assert np.array_equal(parts["eval"][EVAL - 1], rows[EVAL - 1])
        assert np.array_equal(parts["test"][0], rows[EVAL]) and parts["test"][0].dtype == rows[0].dtype
    assert not list(data.parent.glob(".*partial"))


def test_parse_arms():
    assert [r.key for r in bench.parse_arms(None)] == [a.name for a in bench.ARMS]
    assert {r.seed for r in bench.parse_arms(None)} == {bench.SEED}
    runs = bench.parse_arms("ours, importance@18,ours@18,distill@17")
    assert [(r.arm.name, r.seed, r.key) for r in runs] == [
        ("ours", 17, "ours"), ("importance", 18, "importance@18"), ("ours", 18, "ours@18"),
        ("distill", 17, "distill")]
    assert [r.learned for r in runs] == [True, False, True, True]
    for text, message in (("ours,nope", "unknown arm 'nope' (known: ours, paper,"), ("ours@x", "must be an integer"),
                          ("ours,ours@17", "ours is given twice"), ("", "unknown arm ''")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            bench.parse_arms(text)


def test_arms_at_two_seeds_report_the_same_budget(tmp_path, data, capsys):
    out = tmp_path / "bench"
    argv = _argv(out, data, "--budget", str(BUDGET), "--prune-budget", str(PRUNE_BUDGET), "--arms", ARMS)
    assert bench.main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(line["arms"]) == KEYS and line["prune_budget"] == PRUNE_BUDGET
    batches = [max(1, round(n * b)) for n, b in ((bench.PRUNE_BATCHES, BUDGET * PRUNE_BUDGET),
                                                 (bench.CONTINUE_BATCHES, BUDGET))]
    assert [line["prune_batches"], line["continue_batches"]] == batches and line["batch_tokens"] == 4 * 32
    for key, arm in line["arms"].items():
        assert set(arm["ppl"]) == set(DOMAINS) and arm["mean_ppl"] > 0 and arm["wall_s"] > 0, key
        assert arm["start_mean_ppl"] > 0 and arm["seed"] == (18 if key.endswith("@18") else 17), key
        assert arm["worst_domain"] in DOMAINS and arm["params"] == line["arms"]["ours"]["params"]
        assert ("cut_report" in arm) == (key in ("ours", "distill@18")), key
    assert set(line["arms"]["ours"]["cut_report"]) >= {"layer", "hidden"}
    assert line["reference"]["worst_gap"] == 0 and line["reference"]["params"] > line["arms"]["ours"]["params"]
    results = {key: json.loads((out / key / "result.json").read_text()) for key in KEYS}
    assert {r["train_tokens"] for r in results.values()} == {sum(batches) * 4 * 32}  # every arm alike
    assert {d: v["tokens"] for d, v in results["ours"]["domains"].items()} == {d: TEST * 31 for d in DOMAINS}
    assert results["ours"]["start"]["model"] == str(out / "ours" / "pruned")
    assert results["distill@18"]["start"]["model"] == str(out / "distill@18" / "pruned")
    for stage in ("prune", "continue"):
        recipe = (out / "distill@18" / f"{stage}.yaml").read_text()
        assert "distill:" in recipe and "seed: 18" in recipe, stage
    assert "seed: 18" in (out / "importance@18" / "continue.yaml").read_text()
    for key in ("importance", "importance@18"):
        assert (out / key / "pruned" / "summary.json").is_file()
    assert results["importance"]["start"]["ppl"] != results["importance@18"]["start"]["ppl"]  # other calibration
    reference = json.loads((out / "reference_losses.json").read_text())
    assert reference["split"] == str(data / "eval") and reference["row_split"] == str(data / "test")
    assert reference["reference_losses"] != [reference["row"]["domains"][d]["loss"] for d in DOMAINS]
    for stage in ("prune", "continue"):  # finished arms keep no Composer checkpoint, only what they reported
        assert (out / "ours" / stage / "metrics.jsonl").is_file() and not list((out / "ours" / stage).glob("*.pt"))
    assert (out / "ours" / "pruned" / "masks.pt").is_file() and (out / "ours" / "final" / "config.json").is_file()
    table = (out / "results.md").read_text()
    assert table.splitlines()[0].split("|")[2:5] == [f" {d} " for d in DOMAINS] and "| cut ppl |" in table
    assert "| ours | layer |" in table and "size error %" in table

    stamps = {key: (out / key / "result.json").stat().st_mtime_ns for key in KEYS}
    assert bench.main(argv) == 0  # resumed: every arm is skipped
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arms"] == line["arms"]
    assert {key: (out / key / "result.json").stat().st_mtime_ns for key in KEYS} == stamps
    with pytest.raises(SystemExit) as exit_info:  # the finished arms had another pruning budget: refused, not mixed
        bench.main(argv[:-4] + ["--prune-budget", "1"])
    assert exit_info.value.code == 2 and "other settings" in capsys.readouterr().err


def test_without_a_test_split_the_eval_split_is_evaluated_with_a_warning(tmp_path, full, caplog, capsys):
    out = tmp_path / "bench"
    argv = _argv(out, full, "--budget", str(BUDGET), "--prune-budget", str(PRUNE_BUDGET), "--arms",
                 "scratch,paper,importance-distill", "--keep-checkpoints")
    assert bench.main(argv) == 0
    for stage in ("prune", "continue"):
        assert (out / "paper" / stage / "latest-rank0.pt").is_file(), stage
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["test"] == str(full / "eval") and "has no test split" in caplog.text
    assert line["arms"]["scratch"]["start_mean_ppl"] > 0 and "cut_report" in line["arms"]["paper"]
    reference = json.loads((out / "reference_losses.json").read_text())
    assert reference["reference_losses"] == [reference["row"]["domains"][d]["loss"] for d in DOMAINS]
    recipe = (out / "paper" / "prune.yaml").read_text()  # the paper's settings, merged last
    assert "constraint: overall" in recipe and "harden_from: 1.0" in recipe and "distill: null" in recipe
    assert "eta: 1.0" in (out / "paper" / "continue.yaml").read_text()
    assert "distill:" in (out / "importance-distill" / "continue.yaml").read_text()  # Minitron's: one-shot + KD
    assert not (out / "importance-distill" / "prune.yaml").exists()


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0"], "--budget must be positive"),
    (["--prune-budget", "-1"], "--prune-budget must be positive"),
    (["--arms", "ours,importance,bogus@3"], "unknown arm 'bogus' (known: ours, paper, importance"),
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
