"""scripts/bench_quality.py on a tiny source and tiny data: arms at two seeds, the held-out test split, the start
models' evaluation, the cut report, the JSON line and tables; bad arguments refused before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from recipe_fixtures import DOMAINS, write_mds
from script_modules import script

from llmshear.config.schema import OptimizerSection, PruningSection
from llmshear.costs import forward_flops_per_token, train_flops_per_token
from llmshear.datasets.mds import MDSDomain
from llmshear.files import Lock
from llmshear.loggers import read_metrics
from llmshear.models.hf import load_config
from llmshear.models.l0 import TargetShape

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


def test_arms_at_two_seeds_spend_the_same_flops(tmp_path, data, capsys):
    out = tmp_path / "bench"
    argv = _argv(out, data, "--budget", str(BUDGET), "--prune-budget", str(PRUNE_BUDGET), "--arms", ARMS)
    assert bench.main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(line["arms"]) == KEYS and line["prune_budget"] == PRUNE_BUDGET and line["match"] == "flops"
    batches = [max(1, round(n * b)) for n, b in ((bench.PRUNE_BATCHES, BUDGET * PRUNE_BUDGET),
                                                 (bench.CONTINUE_BATCHES, BUDGET))]
    assert [line["prune_batches"], line["continue_batches"]] == batches and line["batch_tokens"] == 4 * 32
    ours = line["arms"]["ours"]
    per_batch = ours["flops_per_batch"]
    assert per_batch["prune"] > 2 * per_batch["continue"]  # a dense masked step: the source's shape
    # The budget: ours' schedule with dense pruning steps. Its compact steps cost what they computed (logged per
    # batch), at most the source's shape; the continued stage spends the rest.
    flops = json.loads((out / "ours" / "result.json").read_text())["flops"]
    budget = flops["calibration"] + batches[0] * per_batch["prune"] + batches[1] * per_batch["continue"]
    logged = [line_["l0/batch_flops"] for line_ in read_metrics(out / "ours" / "prune" / "metrics.jsonl")
              if "l0/batch_flops" in line_]
    assert len(logged) == batches[0] and flops["prune"] == pytest.approx(sum(logged))
    assert 0 < flops["prune"] <= batches[0] * per_batch["prune"]
    assert ours["train_batches"]["prune"] == batches[0] and ours["train_batches"]["continue"] >= batches[1]
    assert "prune_flops_frozen" not in ours  # its one pruning batch ends before the masks freeze
    for key in ("ours", "importance", "importance@18"):  # 32 calibration sequences leave importance one batch
        arm = line["arms"][key]
        assert abs(arm["train_flops"] - budget) <= arm["flops_per_batch"]["continue"], key
    for key in ("importance", "importance@18"):
        assert line["arms"][key]["train_batches"] == {"prune": 0, "continue": 1}, key
    distill = line["arms"]["distill@18"]  # the teacher's forwards: dearer steps, as few as fill the budget
    assert distill["flops_per_batch"]["continue"] > ours["flops_per_batch"]["continue"]
    assert distill["train_batches"] == {"prune": batches[0], "continue": 1}
    for key, arm in line["arms"].items():
        assert set(arm["ppl"]) == set(DOMAINS) and arm["mean_ppl"] > 0 and arm["wall_s"] > 0, key
        assert arm["start_mean_ppl"] > 0 and arm["seed"] == (18 if key.endswith("@18") else 17), key
        assert arm["worst_domain"] in DOMAINS and arm["params"] == line["arms"]["ours"]["params"]
        assert ("cut_report" in arm) == (key in ("ours", "distill@18")), key
    assert set(line["arms"]["ours"]["cut_report"]) >= {"layer", "hidden"}
    assert line["reference"]["worst_gap"] == 0 and line["reference"]["params"] > line["arms"]["ours"]["params"]
    results = {key: json.loads((out / key / "result.json").read_text()) for key in KEYS}
    assert results["ours"]["train_tokens"] == sum(ours["train_batches"].values()) * 4 * 32
    for key, result in results.items():
        assert sum(result["flops"].values()) == pytest.approx(result["train_flops"]), key
    assert line["pairs"] == []  # no two arms share two seeds
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
    assert f"| {batches[0]} + {ours['train_batches']['continue']} |" in table

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
                 "scratch,paper,importance-distill", "--keep-checkpoints", "--match", "tokens")
    assert bench.main(argv) == 0
    for stage in ("prune", "continue"):
        assert (out / "paper" / stage / "latest-rank0.pt").is_file(), stage
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["match"] == "tokens"
    batches = {key: arm["train_batches"] for key, arm in line["arms"].items()}  # every arm the same tokens
    assert {sum(b.values()) for b in batches.values()} == {line["prune_batches"] + line["continue_batches"]}
    assert batches["paper"]["prune"] == line["prune_batches"] and batches["scratch"]["prune"] == 0
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


def test_a_second_bench_on_the_same_out_is_refused_naming_the_first(tmp_path, data, capsys):
    out = tmp_path / "bench"
    first = Lock(out / bench.LOCK)  # a live holder (this process) of the folder
    first.acquire()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(_argv(out, data, "--arms", "importance"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is in use by another bench_quality.py" in err and f"pid {os.getpid()}" in err
    assert sorted(p.name for p in out.iterdir()) == [bench.LOCK] and first.read() == first.holder
    first.release()


def test_missing_data_fails_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(_argv(tmp_path / "bench", tmp_path / "nowhere"))
    assert exit_info.value.code == 2 and "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_a_corpus_without_jsonl_domains_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "corpus" / "alpha").mkdir(parents=True)
    (tmp_path / "corpus" / "alpha" / "notes.txt").write_text("not a jsonl file\n")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(tmp_path / "bench"), "--corpus", str(tmp_path / "corpus")])
    assert exit_info.value.code == 2 and "no <domain>/*.jsonl file there" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def _bench(prune_batches=36, continue_batches=44):
    source = load_config("tiny-smollm2")
    target = TargetShape.from_dict(TARGET, source).to_config(source)
    return bench.Bench(Path("out"), Path("data"), Path("data/test"), "tiny-smollm2", TARGET, prune_batches,
                       continue_batches, seq_len=32, batch_tokens=4 * 32, shapes=(source, target))


def test_an_arm_that_stops_at_the_freeze_ramps_as_ours_and_freezes_on_its_last_batch():
    b = _bench()
    assert bench.pruning_plan(b, bench.ArmRun(bench.ARM_BY_NAME["ours"])) == (36, {})
    batches, keys = bench.pruning_plan(b, bench.ArmRun(bench.ARM_BY_NAME["freeze-cut"]))
    demo = OmegaConf.load(bench.PRUNE_RECIPE).pruning
    assert batches == round(demo.harden_from * 36) == 25
    assert round(keys["pruning"]["sparsity_warmup"] * batches) == round(demo.sparsity_warmup * 36)  # as ours'
    assert round(keys["pruning"]["harden_from"] * batches) == batches - 1  # its last batch trains 0/1 masks
    batches, keys = bench.pruning_plan(b, bench.ArmRun(bench.ARM_BY_NAME["short"]))
    assert batches == round(demo.harden_from * 18) and round(keys["pruning"]["harden_from"] * batches) == batches - 1


def test_flops_budget_counts_pruning_at_the_source_shape_and_teachers():
    b = _bench()
    source, target = b.shapes
    plans = {name: bench.plan_batches(b, bench.ArmRun(arm)) for name, arm in bench.ARM_BY_NAME.items()}
    spent = {name: bench.arm_flops(b, bench.ArmRun(bench.ARM_BY_NAME[name]), plans[name]) for name in plans}
    ours = spent["ours"]
    assert plans["ours"] == {"prune": 36, "continue": 44}
    assert ours["per_batch"] == {"prune": 128 * train_flops_per_token(source, 32),
                                 "continue": 128 * train_flops_per_token(target, 32)}
    assert ours["parts"]["calibration"] == 4 * 4 * 32 * forward_flops_per_token(source, 32)  # importance init
    assert spent["importance"]["parts"]["calibration"] == 2 * ours["parts"]["calibration"]
    for name, cost in spent.items():  # every arm within half a continued batch of ours' FLOPs
        assert abs(cost["total"] - ours["total"]) <= cost["per_batch"]["continue"] / 2, name
    assert plans["freeze-cut"]["continue"] > plans["ours"]["continue"] and plans["short"]["prune"] < 25
    assert spent["importance-distill"]["per_batch"]["continue"] == 128 * train_flops_per_token(target, 32, source)
    # A learned arm's pruning run measured (compact steps): the FLOPs it did not spend go to continued batches.
    half = ours["parts"]["prune"] / 2
    measured = bench.plan_batches(b, bench.ArmRun(bench.ARM_BY_NAME["ours"]), prune_flops=half)
    assert measured == {"prune": 36, "continue": 44 + round(half / ours["per_batch"]["continue"])}
    assert bench.arm_flops(b, bench.ArmRun(bench.ARM_BY_NAME["ours"]), measured, half)["parts"]["prune"] == half
    dense = bench.ArmRun(bench.ARM_BY_NAME["dense"])  # every step at the source's shape: ours' schedule exactly
    assert bench.plan_batches(b, dense, prune_flops=ours["parts"]["prune"]) == {"prune": 36, "continue": 44}
    b.match = "tokens"
    assert bench.plan_batches(b, bench.ArmRun(bench.ARM_BY_NAME["freeze-cut"])) == {"prune": 25, "continue": 55}
    assert bench.plan_batches(b, bench.ArmRun(bench.ARM_BY_NAME["importance"])) == {"prune": 0, "continue": 80}


def test_the_cluster_arm_takes_the_shipped_7b_pruning_keys():
    shipped = bench.ARM_BY_NAME["cluster"].prune_overrides
    for recipe in ("prune_1.3b.yaml", "prune_2.7b.yaml"):  # both 7B recipes ship the keys the arm measures
        cfg = OmegaConf.load(bench.REPO / "yaml" / recipe)
        assert {s: {k: cfg[s][k] for k in keys} for s, keys in bench.CLUSTER_KEYS.items()} == shipped, recipe
    # ... and they are ours' (the demo recipe's, or the defaults it leaves): every one of them measured
    demo = OmegaConf.load(bench.PRUNE_RECIPE)
    defaults = {"pruning": PruningSection(target={}), "optimizer": OptimizerSection()}
    assert {s: {k: demo[s].get(k, getattr(defaults[s], k)) for k in keys}
            for s, keys in bench.CLUSTER_KEYS.items()} == shipped
    assert bench.ARM_BY_NAME["row"].prune_overrides["pruning"]["constraint"] == "row"
    assert bench.ARM_BY_NAME["fixed-ranking"].prune_overrides == {"optimizer": {"lag_lr": 0.0}}
    assert bench.ARM_BY_NAME["clamp"].prune_overrides["pruning"]["log_alpha_limit"] != PruningSection(
        target={}).log_alpha_limit  # the original code's clamp, against the shipped one


def test_the_json_line_reports_the_pruning_steps_cost_and_the_gates_where_the_masks_froze(tmp_path):
    (tmp_path / "prune").mkdir()
    lines = [{"batch": 1, "l0/batch_flops": 9.0, "l0/hardened": 0.0},
             {"batch": 2, "l0/freeze/layer/decided": 0.95, "l0/freeze/layer/undecided": 0.0},
             {"batch": 2, "l0/batch_flops": 4.0, "l0/hardened": 1.0}, {"batch": 2, "metrics/eval/x": 1.0},
             {"batch": 3, "l0/batch_flops": 6.0, "l0/hardened": 1.0}]
    (tmp_path / "prune" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert bench.frozen_prune_flops(tmp_path) == 5.0
    assert bench.frozen_prune_flops(tmp_path / "nowhere") is None
    frozen = bench.logged_freeze_report(tmp_path)
    assert frozen == {"freeze_report": {"layer": {"decided": 0.95, "undecided": 0.0}}}
    assert bench.logged_freeze_report(tmp_path / "nowhere") == {}
    row = {"domains": {"a": {"ppl": 2.0}}, "mean_ppl": 2.0, "worst_gap": {"gap": 0.1, "domain": "a"}, "params": 1,
           "train_batches": {"prune": 3, "continue": 1}, "train_flops": 24.0,
           "flops_per_batch": {"prune": 9.0, "continue": 4.0}}
    assert bench.short(row, 5.0)["frozen_vs_continue"] == 1.25 and "prune_flops_frozen" not in bench.short(row)
    assert "freeze_report" not in bench.short(row)
    report = {"layer": {"expected_keep": 2.0, "target_keep": 2, "size_error": 0.0, "decided": 0.5}}
    assert bench.short({**row, **frozen})["freeze_report"] == frozen["freeze_report"]
    table = bench.cut_table([{**row, "arm": "ours", "cut_report": report, **frozen},
                             {**row, "arm": "old", "cut_report": report}])
    assert table[2] == "| ours | layer | 2.0 | 2 | 0.0 | 50.0 | 95.0 |" and table[3].endswith("| 50.0 |  |")


def test_paired_differences_are_the_mean_log_ratio_with_a_t_interval():
    def result(key, seed, ppl):
        return {"arm": key, "seed": seed, "mean_ppl": ppl}

    a, b, seeds = [90.0, 100.0, 120.0], [100.0, 112.0, 135.0], (17, 18, 19)
    results = [result("ours" if s == 17 else f"ours@{s}", s, p) for s, p in zip(seeds, a, strict=True)]
    results += [result("importance" if s == 17 else f"importance@{s}", s, p) for s, p in zip(seeds, b, strict=True)]
    results += [result("random", 17, 500.0), result("random@18", 18, 600.0)]
    pairs = bench.paired_differences(results)
    assert [(p["first"], p["second"], p["seeds"]) for p in pairs] == [
        ("ours", "importance", [17, 18, 19]), ("ours", "random", [17, 18]), ("importance", "random", [17, 18])]
    diffs = np.log(a) - np.log(b)
    half = 4.302653 * diffs.std(ddof=1) / np.sqrt(3)  # Student's t, 2 degrees of freedom, 97.5%
    first = pairs[0]
    assert first["mean"] == pytest.approx(diffs.mean(), abs=1e-5) and first["ratio"] == pytest.approx(
        np.exp(diffs.mean()), abs=1e-4)
    assert [first["low"], first["high"]] == pytest.approx([diffs.mean() - half, diffs.mean() + half], abs=1e-4)
    assert first["high"] < 0  # ours lower at every seed, by a steady margin
    table = bench.pairs_table(pairs)
    assert table[2].startswith("| ours vs importance | 3 | -0.") and len(table) == 5


def test_ours_keeps_the_pruning_runs_rate_and_the_decay_arm_decays_it(tmp_path):
    """The shipped pruning recipes keep the weights' rate after the warm-up (``alpha_f`` 1.0, measured against
    the ``decay-prune`` arm); the continue recipes anneal it."""
    for name, alpha_f in (("ours", 1.0), ("decay-prune", 0.1)):
        arm = bench.ARM_BY_NAME[name]
        recipe = bench.write_recipe(tmp_path / f"{name}.yaml", bench.PRUNE_RECIPE, "test", {"scheduler": {"warmup": 3}},
                                    arm.prune_overrides, "smollm2")
        assert (OmegaConf.load(recipe).scheduler.warmup, OmegaConf.load(recipe).scheduler.alpha_f) == (3, alpha_f)
        assert arm.continue_overrides == {}
    assert OmegaConf.load(bench.CONTINUE_RECIPE).scheduler.get("alpha_f", 0.1) == 0.1
    for recipe in ("prune_1.3b.yaml", "prune_2.7b.yaml", "continue_1.3b.yaml", "continue_2.7b.yaml"):
        shipped = OmegaConf.load(bench.REPO / "yaml" / recipe).scheduler.alpha_f
        assert shipped == (1.0 if recipe.startswith("prune") else 0.1), recipe


def test_prune_only_runs_the_pruning_stage_and_a_later_full_run_continues_from_its_cut(tmp_path, data, capsys):
    out = tmp_path / "bench"
    argv = _argv(out, data, "--budget", "0.2", "--prune-budget", "0.5", "--arms", "ours")  # 4 pruning batches
    assert bench.main([*argv, "--prune-only"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["stage"] == "prune" and list(line["arms"]) == ["ours"] and line["prune_batches"] == 4
    arm = line["arms"]["ours"]
    logged = [m["l0/batch_flops"] for m in read_metrics(out / "ours" / "prune" / "metrics.jsonl")
              if "l0/batch_flops" in m]
    assert arm["prune_batches"] == len(logged) == 4 and arm["prune_flops"] == pytest.approx(sum(logged))
    assert set(arm["freeze_report"]) >= {"layer", "hidden"} and set(arm["cut_report"]) >= {"layer", "hidden"}
    assert 0 < arm["frozen_vs_continue"] <= 1.01  # the frozen masks' steps cost the cut model's, no more
    assert set(arm["start_ppl"]) == set(DOMAINS) and arm["start_mean_ppl"] > 0 and arm["seed"] == 17
    saved = json.loads((out / "ours" / bench.PRUNE_RESULT).read_text())
    assert saved["start"]["model"] == str(out / "ours" / "pruned") and saved["cut_report"] == arm["cut_report"]
    assert not (out / "ours" / "continue").exists() and not (out / "ours" / bench.RESULT).exists()
    assert not list((out / "ours" / "prune").glob("*.pt"))  # checkpoints deleted, the cut model kept
    table = (out / bench.PRUNE_TABLE).read_text()
    decided = f"{100 * arm['freeze_report']['layer']['decided']:.1f}"
    assert f"| 4 | {arm['prune_flops']:.3g} | {arm['frozen_vs_continue']} | {decided} |" in table
    assert "| ours | layer |" in table

    metrics = (out / "ours" / "prune" / "metrics.jsonl").stat().st_mtime_ns
    assert bench.main(argv) == 0  # the full run: the pruning stage and the cut are not run again
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arms"]["ours"]
    assert (out / "ours" / "prune" / "metrics.jsonl").stat().st_mtime_ns == metrics
    assert full["cut_report"] == arm["cut_report"] and full["freeze_report"] == arm["freeze_report"]
    assert full["start_mean_ppl"] == arm["start_mean_ppl"] and full["train_batches"]["prune"] == 4


def test_prune_only_takes_the_learned_arms_and_refuses_one_that_does_not_prune(tmp_path, data, capsys):
    runs = bench.pruning_runs(bench.parse_arms(None), every=True)
    assert [r.key for r in runs] == [a.name for a in bench.ARMS if a.start == "l0"] and "ours" in runs[0].key
    with pytest.raises(SystemExit) as exit_info:
        bench.main(_argv(tmp_path / "bench", data, "--prune-only", "--arms", "ours,importance@18"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--prune-only: arm importance@18 has no pruning stage" in err
    assert not (tmp_path / "bench").exists()
