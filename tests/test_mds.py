"""jsonl → MDS preparation (llmshear.datasets.mds, scripts/prepare_data.py): round trip, determinism, bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from data_fixtures import EOS, REPO, tiny_tokenizer, write_corpus  # noqa: F401 (tiny_tokenizer is a fixture)

from llmshear.datasets.jsonl import BadLineError
from llmshear.datasets.mds import MDSDomain, prepare, token_dtype

SEQ, K = 16, 3


def _sequences(out: Path, domain: str, split: str) -> np.ndarray:
    """A split's sequences of a domain, concatenated: its packed token stream."""
    rows = MDSDomain(out / split / domain)
    return np.stack([rows[i] for i in range(len(rows))]).reshape(-1)


def _documents(stream: np.ndarray, eos: int) -> tuple[list[list[int]], list[int]]:
    """The whole documents of a stream (each ended by EOS, EOS left out) and the tokens after the last EOS."""
    ends = np.flatnonzero(stream == eos)
    pieces = np.split(stream, ends + 1)[: len(ends)]
    return [p[:-1].tolist() for p in pieces], stream[ends[-1] + 1 if len(ends) else 0:].tolist()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    texts = write_corpus(root / "in", {"code": 45, "prose": 30})
    return root, texts


@pytest.fixture(scope="module")
def prepared(corpus, tiny_tokenizer):  # noqa: F811
    root, _ = corpus
    summary = prepare(root / "in", tiny_tokenizer, root / "out", seq_len=SEQ, eval_seqs=K, progress=False)
    return root / "out", summary


def test_round_trip_every_token_reaches_the_shards_and_no_document_spans_both_splits(corpus, prepared,
                                                                                    tiny_tokenizer):  # noqa: F811
    from transformers import AutoTokenizer

    _, texts = corpus
    out, summary = prepared
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    eos = tok.convert_tokens_to_ids(EOS)
    for domain, docs in texts.items():
        info = summary["domains"][domain]
        ids = [tok(doc, add_special_tokens=False)["input_ids"] for doc in docs]
        eval_docs, cut = _documents(_sequences(out, domain, "eval"), eos)
        assert [tok.decode(d, clean_up_tokenization_spaces=False) for d in eval_docs] == docs[: len(eval_docs)]
        straddling = len(eval_docs)  # the document the last eval sequence cuts: its head ends the eval split
        assert ids[straddling][: len(cut)] == cut and info["boundary_tokens"] == len(ids[straddling]) + 1 - len(cut)
        assert not info["shared_document"]
        train = _sequences(out, domain, "train")
        first = straddling + 1  # the train split starts with the next document, whole
        train_docs, tail = _documents(train, eos)
        assert train_docs == ids[first: first + len(train_docs)]
        if tail:  # a document cut by the end of the last sequence: its written tokens are its first tokens
            assert ids[first + len(train_docs)][: len(tail)] == tail
        assert K * SEQ + len(train) == info["tokens"] - info["dropped_tokens"]
        assert len(docs) == first + len(train_docs) + int(bool(tail)) + info["dropped_documents"]


def test_layout_summary_and_dtype(prepared):
    out, summary = prepared
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary and summary["dtype"] == "uint16" and summary["seq_len"] == SEQ
    for domain, info in summary["domains"].items():
        assert info["eval"]["sequences"] == K == len(MDSDomain(out / "eval" / domain))
        assert info["train"]["sequences"] == len(MDSDomain(out / "train" / domain))
        assert info["train"]["tokens"] == SEQ * info["train"]["sequences"]
        assert info["eval"]["documents"] + info["train"]["documents"] + info["dropped_documents"] == info["documents"]
        assert MDSDomain(out / "train" / domain)[0].dtype == np.uint16
    assert summary["domains"]["code"]["documents"] == 45


def test_same_input_same_shards_with_any_worker_count(corpus, prepared, tiny_tokenizer, tmp_path):  # noqa: F811
    root, _ = corpus
    out, _ = prepared
    again = tmp_path / "again"
    prepare(root / "in", tiny_tokenizer, again, seq_len=SEQ, eval_seqs=K, workers=2, progress=False)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)


WORKER_TEARDOWN_MAIN = """
import sys
from pathlib import Path

import composer  # installs Composer's SIGTERM handler here and, through spawn, in every worker

from llmshear.datasets.mds import prepare

if __name__ == "__main__":
    prepare(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), seq_len=16, eval_seqs=1, workers=2, progress=False)
"""


def test_tokenizer_pool_ends_quietly_under_a_main_script_that_imports_composer(corpus, tiny_tokenizer,  # noqa: F811
                                                                               tmp_path):
    main = tmp_path / "main.py"
    main.write_text(WORKER_TEARDOWN_MAIN)
    result = subprocess.run([sys.executable, str(main), str(corpus[0] / "in"), str(tiny_tokenizer),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "summary.json").is_file()
    assert "Exception ignored" not in result.stderr and "SystemExit" not in result.stderr, result.stderr


def test_compressed_inputs_read_like_plain_ones(tmp_path, tiny_tokenizer):  # noqa: F811
    texts = write_corpus(tmp_path / "in", {"d": 40}, docs_per_file=20)
    parts = sorted((tmp_path / "in" / "d").glob("*.jsonl"))
    gz, zst = parts[0].with_suffix(".jsonl.gz"), parts[1].with_suffix(".jsonl.zst")
    gz.write_bytes(gzip.compress(parts[0].read_bytes()))
    zst.write_bytes(zstandard.ZstdCompressor().compress(parts[1].read_bytes()))
    parts[0].unlink()
    parts[1].unlink()
    summary = prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "out", seq_len=SEQ, eval_seqs=1, progress=False)
    assert summary["domains"]["d"]["documents"] == len(texts["d"]) == 40


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)} | {EOS: 70_000, "[UNK]": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(tmp_path / "tok")
    (tmp_path / "in" / "d").mkdir(parents=True)
    words = " ".join(f"w{i}" for i in range(65_530, 65_560))
    (tmp_path / "in" / "d" / "a.jsonl").write_text(json.dumps({"text": words}) + "\n")
    summary = prepare(tmp_path / "in", tmp_path / "tok", tmp_path / "out", seq_len=8, eval_seqs=1, progress=False)
    assert summary["dtype"] == "uint32" and token_dtype(128_256) == "uint32" and token_dtype(65_536) == "uint16"
    stream = np.concatenate([_sequences(tmp_path / "out", "d", split) for split in ("eval", "train")])
    assert stream.dtype == np.uint32 and stream.tolist() == list(range(65_530, 65_560))[: len(stream)]
    assert summary["domains"]["d"]["shared_document"]  # one document: its tail trains, with a warning


def _bad_corpus(root: Path) -> Path:
    good = [json.dumps({"text": f"good document number {i} " * 5}) for i in range(12)]
    bad = [b"{not json", json.dumps({"txt": "x"}).encode(), json.dumps({"text": "  "}).encode(),
           b'{"text": "caf\xe9"}', b"[1, 2]", json.dumps({"text": 3}).encode()]
    lines = [g.encode() for g in good[:6]] + bad + [b""] + [g.encode() for g in good[6:]]
    (root / "d").mkdir(parents=True)
    (root / "d" / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root / "d" / "mixed.jsonl"


def test_bad_lines_are_counted_with_file_and_line(tmp_path, tiny_tokenizer):  # noqa: F811
    path = _bad_corpus(tmp_path / "in")
    summary = prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "out", seq_len=SEQ, eval_seqs=1, progress=False)
    assert summary["domains"]["d"]["documents"] == 12 and summary["bad_lines"] == 6
    assert summary["bad_line_files"][str(path)]["count"] == 6
    examples = summary["bad_line_files"][str(path)]["examples"]
    assert examples == [f"{path}:7: invalid JSON (Expecting property name enclosed in double quotes, column 2)",
                        f"{path}:8: no 'text' field", f"{path}:9: empty 'text'"]


def test_strict_fails_at_the_first_bad_line(tmp_path, tiny_tokenizer):  # noqa: F811
    path = _bad_corpus(tmp_path / "in")
    with pytest.raises(BadLineError, match=f"^{path}:7: invalid JSON"):
        prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "out", seq_len=SEQ, eval_seqs=1, strict=True,
                progress=False)
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_is_reported(tmp_path, tiny_tokenizer):  # noqa: F811
    (tmp_path / "in" / "d").mkdir(parents=True)
    (tmp_path / "in" / "d" / "a.jsonl").write_bytes(b'{"text": "caf\xe9"}\n' + b'{"text": "fine text here"}\n' * 9)
    with pytest.raises(BadLineError, match=r"a\.jsonl:1: invalid UTF-8 at byte 13"):
        prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "out", seq_len=4, eval_seqs=1, strict=True,
                progress=False)


def test_existing_output_is_refused_unless_overwrite(prepared, corpus, tiny_tokenizer, tmp_path):  # noqa: F811
    root, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(root / "in", tiny_tokenizer, out, seq_len=SEQ, eval_seqs=K, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    prepare(root / "in", tiny_tokenizer, out, seq_len=SEQ, eval_seqs=K, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "summary.json").is_file()


def test_domain_with_too_few_sequences_is_named(tmp_path, tiny_tokenizer):  # noqa: F811
    write_corpus(tmp_path / "in", {"big": 40, "tiny": 1})
    with pytest.raises(ValueError, match=r"domain 'tiny': \d sequence\(s\) of 16 tokens, fewer than --eval-seqs 5"):
        prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "out", seq_len=SEQ, eval_seqs=5, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seq_len": 1}, "--seq-len 1: must be at least 2"),
    ({"eval_seqs": 0}, "--eval-seqs 0: must be at least 1"),
    ({"workers": 0}, "--workers 0: must be at least 1"),
    ({"domains": ["nope"]}, "domain 'nope': .* is not a directory"),
])
def test_bad_arguments_fail_before_any_work(corpus, tiny_tokenizer, tmp_path, kwargs, message):  # noqa: F811
    root, _ = corpus
    args = {"seq_len": SEQ, "eval_seqs": K} | kwargs
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        prepare(root / "in", tiny_tokenizer, tmp_path / "out", progress=False, **args)


def test_input_layout_errors(tmp_path, tiny_tokenizer):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="no such directory"):
        prepare(tmp_path / "missing", tiny_tokenizer, tmp_path / "out", seq_len=SEQ, eval_seqs=1)
    (tmp_path / "in" / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"domain 'empty': no .jsonl/.jsonl.gz/.jsonl.zst files"):
        prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "out", seq_len=SEQ, eval_seqs=1)


def test_command_line(corpus, tiny_tokenizer, tmp_path):  # noqa: F811
    root, _ = corpus
    command = [sys.executable, "scripts/prepare_data.py", "--input", str(root / "in"), "--tokenizer",
               str(tiny_tokenizer), "--out", str(tmp_path / "out"), "--seq-len", "16", "--eval-seqs", "2",
               "--domains", "prose"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(result["domains"]) == ["prose"] and result["domains"]["prose"]["eval_sequences"] == 2
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr


def test_demo_corpus_is_real_local_text_and_deterministic(tmp_path):
    from llmshear.tools.demo import make_demo_corpus

    summary = make_demo_corpus(tmp_path / "one", max_chars=200_000, docs_per_file=7)
    assert set(summary) == {"code", "docs", "readme"}
    for name, info in summary.items():
        files = sorted((tmp_path / "one" / name).glob("*.jsonl"))
        assert len(files) == info["files"] >= 1 and info["characters"] >= 10_000
        first = json.loads(files[0].read_text().splitlines()[0])
        assert first["text"].strip() and first["source"].split("/")[0] in {"stdlib", "pydoc_data", "metadata"}
    make_demo_corpus(tmp_path / "two", max_chars=200_000, docs_per_file=7)
    for path in (tmp_path / "one").rglob("*.jsonl"):
        assert path.read_bytes() == (tmp_path / "two" / path.relative_to(tmp_path / "one")).read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_demo_corpus(tmp_path / "one")


def test_demo_corpus_default_size_gives_over_a_million_tokens(tmp_path):
    from llmshear.tools.demo import make_demo_corpus

    summary = make_demo_corpus(tmp_path / "demo")
    # SmolLM2's tokenizer averages under 4 characters per token on this text (1.30M tokens measured)
    assert sum(info["characters"] for info in summary.values()) >= 4_500_000
