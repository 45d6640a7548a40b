"""Token budgets of prepare_data (``--max-tokens``, ``--proportions``, ``--exclude-read``): each domain's reading
stops at its budget, the output is a prefix of the unlimited one whatever the worker count, and two sets drawn from
one corpus share no file."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from data_fixtures import REPO, tiny_tokenizer, write_corpus  # noqa: F401 (tiny_tokenizer is a fixture)
from script_modules import script

from llmshear.datasets.mds import MDSDomain, prepare

SEQ, K, LIMIT = 16, 3, 200


def _train(out, domain: str) -> np.ndarray:
    rows = MDSDomain(out / "train" / domain)
    return np.stack([rows[i] for i in range(len(rows))])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two domains of 30 files of 5 documents; the last file of ``code`` holds a bad line (counted if read)."""
    root = tmp_path_factory.mktemp("budget")
    texts = write_corpus(root / "in", {"code": 150, "prose": 150}, docs_per_file=5)
    last = sorted((root / "in" / "code").glob("*.jsonl"))[-1]
    last.write_text(last.read_text() + "{not json\n")
    return root, texts


@pytest.fixture(scope="module")
def whole(corpus, tiny_tokenizer):  # noqa: F811
    out = corpus[0] / "whole"
    return out, prepare(corpus[0] / "in", tiny_tokenizer, out, seq_len=SEQ, eval_seqs=K, progress=False)


def test_each_domain_stops_at_its_budget_and_later_files_are_never_opened(corpus, whole, tiny_tokenizer, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    root, texts = corpus
    out = tmp_path / "budget"
    summary = prepare(root / "in", tiny_tokenizer, out, seq_len=SEQ, eval_seqs=K, progress=False,
                      max_tokens=LIMIT)
    full_out, full = whole
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert full["bad_lines"] == 1 and summary["bad_lines"] == 0  # the last file of `code` was not read
    for domain, info in summary["domains"].items():
        longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in texts[domain])
        train = _train(out, domain)
        assert LIMIT - SEQ < train.size <= LIMIT + longest < _train(full_out, domain).size
        assert np.array_equal(train, _train(full_out, domain)[: len(train)])  # a prefix of the whole stream
        assert info["max_tokens"] == LIMIT and info["budget_met"] is True
        assert np.array_equal(MDSDomain(out / "eval" / domain)[0], MDSDomain(full_out / "eval" / domain)[0])
    read = summary["read_files"]
    assert 0 < len(read) < len(full["read_files"]) == 60
    assert sum(use["documents"] for use in read.values()) == sum(i["documents"] for i in summary["domains"].values())
    assert [use["complete"] for use in read.values()].count(False) <= 2  # at most the last file of each domain


def test_budget_output_is_the_same_with_workers(corpus, tiny_tokenizer, tmp_path):  # noqa: F811
    outs = [tmp_path / f"w{workers}" for workers in (1, 2)]
    summaries = [prepare(corpus[0] / "in", tiny_tokenizer, out, seq_len=SEQ, eval_seqs=K, progress=False,
                         max_tokens={"code": LIMIT, "prose": 3 * LIMIT}, workers=workers)
                 for workers, out in zip((1, 2), outs, strict=True)]
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.mds"))
    assert files and all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)
    assert summaries[0]["read_files"] == summaries[1]["read_files"]
    trained = {domain: info["train"]["tokens"] for domain, info in summaries[0]["domains"].items()}
    assert trained["code"] > LIMIT - SEQ and trained["prose"] > 3 * LIMIT - SEQ


def test_exclude_read_draws_a_second_set_from_the_files_the_first_left(corpus, whole, tiny_tokenizer, tmp_path,  # noqa: F811
                                                                        caplog):
    first = prepare(corpus[0] / "in", tiny_tokenizer, tmp_path / "prune", seq_len=SEQ, eval_seqs=K, progress=False,
                    max_tokens=LIMIT)
    second = prepare(corpus[0] / "in", tiny_tokenizer, tmp_path / "continue", seq_len=SEQ, eval_seqs=K,
                     progress=False, exclude_read=[tmp_path / "prune"])
    assert second["excluded_files"] == len(first["read_files"]) > 0
    assert not set(first["read_files"]) & set(second["read_files"])
    assert len(first["read_files"]) + len(second["read_files"]) == len(whole[1]["read_files"])
    elsewhere = tmp_path / "elsewhere"
    write_corpus(elsewhere, {"code": 10}, docs_per_file=5)
    with caplog.at_level(logging.WARNING):
        other = prepare(elsewhere, tiny_tokenizer, tmp_path / "other", seq_len=SEQ, eval_seqs=K, progress=False,
                        exclude_read=[tmp_path / "prune"])
    assert other["excluded_files"] == 0 and "none of this input's files is among the" in caplog.text
    with pytest.raises(ValueError, match=r"--exclude-read .*no summary.json with 'read_files'"):
        prepare(corpus[0] / "in", tiny_tokenizer, tmp_path / "third", seq_len=SEQ, eval_seqs=K,
                exclude_read=[corpus[0] / "in"])


def test_a_budget_the_input_cannot_meet_is_reported(corpus, whole, tiny_tokenizer, tmp_path, caplog):  # noqa: F811
    with caplog.at_level(logging.WARNING):
        summary = prepare(corpus[0] / "in", tiny_tokenizer, tmp_path / "out", seq_len=SEQ, eval_seqs=K,
                          progress=False, max_tokens={"prose": 10**9})
    assert summary["domains"]["prose"]["budget_met"] is False and summary["domains"]["code"]["budget_met"] is None
    assert summary["domains"] == {d: {**i, "max_tokens": summary["domains"][d]["max_tokens"],
                                      "budget_met": summary["domains"][d]["budget_met"]}
                                  for d, i in whole[1]["domains"].items()}
    assert "domain 'prose': the input held" in caplog.text and "fewer than its --max-tokens 1000000000" in caplog.text


@pytest.mark.parametrize(("text", "count"), [("400M", 400_000_000), ("0.4B", 400_000_000), ("50b", 50 * 10**9),
                                             ("2_000", 2000), ("5e3", 5000), ("1.5k", 1500)])
def test_token_counts_read_as_written(text, count):
    assert script("prepare_data").token_count(text) == count


@pytest.mark.parametrize(("args", "message"), [
    (("0.4Q", None, None), r"--max-tokens '0.4Q': expected a whole number"),
    (("0", None, None), r"--max-tokens '0'"),
    (("1.5", None, None), r"--max-tokens '1.5'"),
    ((None, "0.5,0.5", ["a", "b"]), r"--proportions needs --max-tokens"),
    (("1M", "0.5,0.5", None), r"--proportions needs --domains"),
    (("1M", "0.5,0.5", ["a", "b", "c"]), r"--proportions has 2 values for 3 --domains \(a, b, c\)"),
    (("1M", "0.5,0.6", ["a", "b"]), r"must sum to 1 \(they sum to 1.1\)"),
    (("1M", "0.5,x", ["a", "b"]), r"--proportions '0.5,x': not comma-separated numbers"),
])
def test_bad_budgets_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        script("prepare_data").budgets(*args)


def test_command_line_splits_a_total_by_proportions(corpus, tiny_tokenizer, tmp_path):  # noqa: F811
    command = [sys.executable, "scripts/prepare_data.py", "--input", str(corpus[0] / "in"), "--tokenizer",
               str(tiny_tokenizer), "--out", str(tmp_path / "out"), "--seq-len", str(SEQ), "--eval-seqs", str(K),
               "--domains", "prose,code", "--max-tokens", "0.4k", "--proportions", "0.75,0.25"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["domains"]["prose"]["budget_met"] and line["domains"]["code"]["budget_met"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["max_tokens"] == {"prose": 300, "code": 100}
    bad = subprocess.run(command[:-1] + ["0.75,0.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--proportions '0.75,0.5'" in bad.stderr
