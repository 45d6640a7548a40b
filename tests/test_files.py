"""Two writers on one output, a writer killed mid-way, an output that appears meanwhile, one SLURM allocation with
two job steps: the directory rule and the lock of llmshear.files, and the commands that write through them."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import tiny_tokenizer, write_corpus  # noqa: F401 (tiny_tokenizer: fixture)

from llmshear.datasets.mds import DomainPacker, prepare
from llmshear.files import DiskError, Lock, LockedError, claim_file, new_directory, staging_dir
from llmshear.models.build import PRESETS, build_model
from llmshear.models.hf import save_pretrained


def _gone_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_a_second_writer_is_refused_by_name_and_the_first_finishes(tmp_path):
    out = tmp_path / "out"
    with new_directory(out) as first:
        (first / "a").write_text("first")
        with pytest.raises(FileExistsError, match=r"being written by another command \(lock file .*\.out\.claim: "
                                                  r"host .*, pid \d+"):
            with new_directory(out):
                pass
        assert first.is_dir()  # the refused writer touched nothing
    assert (out / "a").read_text() == "first"
    assert not claim_file(out).exists() and not staging_dir(out).exists()


def test_an_output_finished_meanwhile_is_never_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while this command wrote the data; it is left as it is"):
        with new_directory(out, what="the data") as staging:
            (staging / "mine").write_text("second")
            out.mkdir()
            (out / "theirs").write_text("first")  # another writer finished (one that did not claim)
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert (staging_dir(out) / "mine").read_text() == "second"  # named in the error, cleared by the next writer
    with new_directory(out, overwrite=True) as staging:
        (staging / "third").write_text("third")
    assert [p.name for p in out.iterdir()] == ["third"] and not staging_dir(out).exists()


def test_a_save_over_an_existing_model_leaves_no_staging_folder(tmp_path):
    model = build_model(PRESETS["tiny-gqa"](), seed=0)
    save_pretrained(model, tmp_path / "out")
    save_pretrained(model, tmp_path / "out", overwrite=True)  # merged into the existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_existing_output_is_refused_before_anything_and_an_empty_one_is_filled(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with new_directory(out) as staging:  # an empty directory counts as absent
        (staging / "a").write_text("a")
    with pytest.raises(FileExistsError, match="exists and is not an empty directory; nothing was written"):
        with new_directory(out):
            pytest.fail("entered")
    assert not claim_file(out).exists()


def test_a_failed_writer_leaves_nothing_and_a_killed_one_is_cleaned_by_the_next(tmp_path, caplog):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), new_directory(out) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("tokenizer crashed")
    assert not out.exists() and not staging_dir(out).exists() and not claim_file(out).exists()
    killed = Lock(claim_file(out))  # what a SIGKILL leaves: its claim and its staging folder
    killed.holder["pid"] = _gone_pid()
    killed.acquire()
    staging_dir(out).mkdir()
    (staging_dir(out) / "half").write_text("x")
    with new_directory(out) as staging:
        assert not any(staging.iterdir())
        (staging / "whole").write_text("y")
    assert "taking over the lock" in caplog.text and [p.name for p in out.iterdir()] == ["whole"]


@pytest.mark.parametrize(("restart", "stale"), [("0", False), ("1", True)])
def test_one_allocation_two_job_steps_refuse_a_requeue_takes_over(tmp_path, monkeypatch, restart, stale):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = Lock(tmp_path / "run.lock")
        holder.holder["pid"] = live.pid  # a live step of this allocation (or the earlier incarnation's record)
        holder.acquire()
        assert json.loads((tmp_path / "run.lock").read_text())["slurm_restart"] == "0"
        monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
        other = Lock(tmp_path / "run.lock")
        if stale:
            other.acquire()
            assert other.read() == other.holder
        else:
            with pytest.raises(LockedError, match=f"pid {live.pid}"):
                other.acquire()
    finally:
        live.kill()
        live.wait()


def test_a_lock_removes_the_folders_it_made_and_survives_one_removed_under_it(tmp_path, monkeypatch):
    (tmp_path / "kept").mkdir()
    first = Lock(tmp_path / "kept" / "a" / "b" / "run.lock")
    first.acquire()
    first.release()  # nothing written beside the lock: the folders it made go, the one that existed stays
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
    folder, made = tmp_path / "x" / "y", Path.mkdir
    removed = []

    def mkdir_then_removed(self, *args, **kwargs):  # another process releases its lock and removes the folder
        made(self, *args, **kwargs)                  # between this one's mkdir and its creating the lock file
        if self == folder and not removed:
            removed.append(self)
            self.rmdir()

    monkeypatch.setattr(Path, "mkdir", mkdir_then_removed)
    second = Lock(folder / "run.lock")
    second.acquire()
    assert removed and second.read() == second.holder
    (folder / "checkpoint.pt").write_bytes(b"x")
    second.release()  # the folder holds what the run wrote: kept
    assert sorted(p.name for p in (tmp_path / "x").rglob("*")) == ["checkpoint.pt", "y"]


def test_prepare_and_save_refuse_an_output_another_writer_holds(tmp_path, tiny_tokenizer):  # noqa: F811
    write_corpus(tmp_path / "in", {"alpha": 20, "beta": 20})
    data, model_dir = tmp_path / "data", tmp_path / "model"
    with new_directory(data), new_directory(model_dir):
        with pytest.raises(FileExistsError, match="being written by another command"):
            prepare(tmp_path / "in", tiny_tokenizer, data, seq_len=16, eval_seqs=1, progress=False)
        with pytest.raises(FileExistsError, match="being written by another command"):
            save_pretrained(build_model(PRESETS["tiny-gqa"](), seed=0), model_dir)
        assert not data.exists() and not model_dir.exists()
        assert not any(staging_dir(data).iterdir()) and not any(staging_dir(model_dir).iterdir())
    data.rmdir()  # what the holders wrote: nothing
    prepare(tmp_path / "in", tiny_tokenizer, data, seq_len=16, eval_seqs=1, progress=False)
    assert (data / "summary.json").is_file() and not claim_file(data).exists()


@pytest.mark.parametrize(("content", "why"), [
    ("", r"its 1 file\(s\) hold no document with text"),
    ('{"text": ""}\n', r"1 of its 1 file\(s\) skipped or with bad lines, see the warnings above"),
])
def test_a_domain_without_documents_says_why(tmp_path, tiny_tokenizer, content, why):  # noqa: F811
    write_corpus(tmp_path / "in", {"alpha": 20})
    (tmp_path / "in" / "empty").mkdir()
    (tmp_path / "in" / "empty" / "part.jsonl").write_text(content)
    with pytest.raises(ValueError, match=rf"domain 'empty': no document was read \({why}\)"):
        prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "data", seq_len=16, eval_seqs=1, progress=False)
    assert not (tmp_path / "data").exists() and not staging_dir(tmp_path / "data").exists()


def test_a_full_disk_while_preparing_is_one_error_naming_the_folder_and_nothing_is_lost(
        tmp_path, tiny_tokenizer, monkeypatch):  # noqa: F811
    write_corpus(tmp_path / "in", {"alpha": 20, "beta": 20})
    out = tmp_path / "data"
    prepare(tmp_path / "in", tiny_tokenizer, out, seq_len=16, eval_seqs=1, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DomainPacker, "close", full)
    with pytest.raises(DiskError, match=rf"{tmp_path}: writing the data failed: No space left on device; [\d.]+ GB "
                                        rf"free there now\. Nothing was written to {out} or replaced"):
        prepare(tmp_path / "in", tiny_tokenizer, out, seq_len=16, eval_seqs=1, progress=False, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the finished output is untouched
    assert not staging_dir(out).exists() and not claim_file(out).exists()
