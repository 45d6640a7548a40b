"""Downstream evaluation (scripts/eval_downstream.py, llmshear.tools.downstream) and our local task demo_continuation.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from script_modules import script

from llmshear.tools.demo import DOMAINS, make_demo_corpus
from llmshear.tools.downstream import PAPER_TASKS, TaskSpec, parse_task
from llmshear.tools.tasks import TASKS_DIR
from llmshear.tools.tasks.continuation import CHOICES, build_items

REPO = Path(__file__).resolve().parents[1]
ITEMS = TASKS_DIR / "demo_continuation" / "items.jsonl"


def _items() -> list[dict]:
    return [json.loads(line) for line in ITEMS.read_text(encoding="utf-8").splitlines()]


def test_items_are_well_formed_and_the_answer_is_the_text_that_follows():
    items = _items()
    assert len(items) >= 100 and ITEMS.stat().st_size < 300_000
    assert {item["domain"] for item in items[:2]} == {"code", "readme"}  # interleaved: --limit keeps both
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    checked = 0
    for item in items:
        assert len(item["choices"]) == CHOICES == len(set(item["choices"])) and 0 <= item["gold"] < CHOICES
        if item["source"].startswith("stdlib/"):
            text = (stdlib / item["source"].removeprefix("stdlib/")).read_text(encoding="utf-8")
            assert item["passage"] + item["choices"][item["gold"]] in text
            checked += 1
    assert checked == sum(item["domain"] == "code" for item in items) > 0
    golds = [item["gold"] for item in items]
    assert max(golds.count(g) for g in range(CHOICES)) < 0.4 * len(items)  # the answer's position is not a cue


def test_items_are_held_out_from_the_demo_corpus(tmp_path):
    """No item comes from a document the demo trains on (its corpus is built here with demo.sh's --max-chars)."""
    max_chars = int(re.search(r"make_demo_corpus\.py \S+ --max-chars (\d+)", (REPO / "scripts/demo.sh").read_text())[1])
    assert script("make_downstream_task").DEMO_MAX_CHARS == max_chars
    make_demo_corpus(tmp_path / "corpus", max_chars=max_chars)
    trained = {json.loads(line)["source"] for path in (tmp_path / "corpus").glob("*/*.jsonl")
               for line in path.read_text(encoding="utf-8").splitlines()}
    assert len(trained) > 50
    assert not trained & {item["source"] for item in _items()}


def test_building_is_deterministic_and_seeded():
    domains = {name: lambda name=name: itertools.islice(DOMAINS[name](), 40) for name in ("code", "docs")}
    first, again = build_items(domains, 6, 100_000, seed=3), build_items(domains, 6, 100_000, seed=3)
    assert first == again and [item["domain"] for item in first[:4]] == ["code", "docs", "code", "docs"]
    assert len(first) == 12 and build_items(domains, 6, 100_000, seed=4) != first
    with pytest.raises(ValueError, match="--per-domain 2"):
        build_items(domains, 2, 100_000)
    with pytest.raises(ValueError, match="'code': only"):
        build_items({"code": lambda: itertools.islice(DOMAINS["code"](), 3)}, 500, 0)


def test_the_task_loads_through_lm_eval_from_local_files():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    task = manager.load(["demo_continuation"])["tasks"]["demo_continuation"]
    docs, items = list(task.test_docs()), _items()
    assert len(docs) == len(items)
    for doc, item in zip(docs[:5], items, strict=False):
        assert task.doc_to_text(doc) == item["passage"]
        assert task.doc_to_choice(doc) == item["choices"] and task.doc_to_target(doc) == item["gold"]


def test_task_arguments():
    assert parse_task("arc_challenge") == TaskSpec("arc_challenge", 25, "acc_norm")
    assert parse_task("hellaswag:0") == TaskSpec("hellaswag", 0, "acc_norm")
    assert parse_task("some_task") == TaskSpec("some_task", None, "acc")
    assert [s.name for s in PAPER_TASKS] == ["sciq", "piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag",
                                            "logiqa", "boolq", "lambada_openai", "mmlu"]
    for bad in ("arc_easy:x", ":5", "mmlu:-1"):
        with pytest.raises(ValueError, match="NAME:SHOTS"):
            parse_task(bad)


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "smollm2", "--tasks", "arc_easy:five"], "NAME:SHOTS"),
    (["--model", "smollm2", "--limit", "0"], "--limit 0"),
    (["--model", "smollm2", "--batch-size", "many"], "--batch-size 'many'"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script("eval_downstream").main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_models_and_devices_are_named(tmp_path, caplog, monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")  # main() sets them for local tasks: restored after this test
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    cases = [(["--model", str(tmp_path / "missing")], f"--model {tmp_path / 'missing'}: not found"),
             (["--model", str(bare)], "has no tokenizer; pass --tokenizer"),
             (["--model", "smollm2", "--device", "cuda:99"], "--device cuda:99")]
    for argv, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert script("eval_downstream").main([*argv, "--tasks", "demo_continuation"]) == 2
        assert message in caplog.text


DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.slow
def test_source_model_beats_a_random_init_model_of_its_shape(tmp_path):
    """The acceptance test: SmolLM2-135M vs random weights of the same shape, on the first 16 items (CPU).

    Chance is 1/4; SmolLM2 reads the passage, so it must be right on at least 5 more of the 16 items
    (a margin of 0.3); measured while writing this test: 0.85 vs 0.20 on 20 items.
    """
    from llmshear.models.build import build_model
    from llmshear.models.hf import load_config, save_pretrained
    from llmshear.sources import load_tokenizer

    random_dir = tmp_path / "random"
    save_pretrained(build_model(load_config("smollm2"), seed=0), random_dir, tokenizer=load_tokenizer("smollm2"))
    # one plain process: an in-process training test earlier in the session leaves torch.distributed's
    # variables (RANK, LOCAL_RANK, ...) in os.environ, which would make accelerate start a process group
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARIABLES} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_downstream.py"), "--model", "smollm2",
                           "--model", str(random_dir), "--tasks", "demo_continuation", "--limit", "16",
                           "--batch-size", "16"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    source = result["models"]["smollm2"]["demo_continuation"]
    chance = result["models"][str(random_dir)]["demo_continuation"]
    assert source["samples"] == chance["samples"] == 16
    assert source["value"] >= chance["value"] + 0.3, (source, chance)
    assert "demo_continuation (0-shot, acc)" in proc.stdout


def test_results_table_and_metric_fallback():
    from llmshear.tools.downstream import _first_metric, format_table

    row = {"alias": "nq_open", "exact_match,remove_whitespace": 0.5, "exact_match,none": 0.25}
    assert _first_metric(row, "nq_open") == "exact_match"
    with pytest.raises(ValueError, match="'nq_open': lm-eval reported no metric"):
        _first_metric({"alias": "nq_open"}, "nq_open")
    cell = {"metric": "acc", "shots": 0}
    table = format_table({"a": {"t1": {**cell, "value": 0.5}, "t2": {**cell, "value": 0.25, "shots": None}},
                          "b": {"t1": {**cell, "value": 0.75}, "t2": {**cell, "value": 0.375, "shots": None}}})
    lines = [line.split() for line in table.splitlines()]
    assert lines[1] == ["t1", "(0-shot,", "acc)", "50.0", "75.0"]
    assert lines[2] == ["t2", "(default", "shots,", "acc)", "25.0", "37.5"]
    assert lines[3] == ["mean", "37.5", "56.2"]


def test_items_from_the_demo_training_text_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        script("make_downstream_task").main(["--skip-chars", "1000", "--out", "unused.jsonl"])
    assert exit_info.value.code == 2 and "--skip-chars 1000: below the demo's 600000" in capsys.readouterr().err
