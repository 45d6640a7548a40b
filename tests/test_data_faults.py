"""Bad data and data faults: each is a clear error naming its file, domain or key (exit 2, no traceback), or a
reported skip; nothing that existed before is changed. Also RedPajama as published, and disjoint stage data."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from data_fixtures import REPO, tiny_tokenizer, write_corpus, write_shards  # noqa: F401 (tiny_tokenizer: fixture)
from recipe_fixtures import DOMAINS, tiny_recipe, write_mds
from script_modules import script

from llmshear import run as train
from llmshear.config import ConfigError, load
from llmshear.datasets.dynamic import build_train_dataloader, part_bounds
from llmshear.datasets.jsonl import BadLines, read_documents
from llmshear.datasets.mds import MDSDomain, ShardError, prepare
from llmshear.models.hf import config_to_hf, load_config

SEQ = 32


def digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file below ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def prepare_args(source: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(source), "--tokenizer", str(tokenizer), "--out", str(out), "--seq-len", "16",
            "--eval-seqs", "1", *extra]


# --- prepare_data: --out overlapping --input -------------------------------------------------------------------

@pytest.mark.parametrize(("where", "relation"), [("same", "is"), ("inside", "is inside"), ("around", "contains")])
def test_out_overlapping_input_is_refused_and_nothing_changes(tmp_path, tiny_tokenizer, caplog, where, relation):  # noqa: F811
    source = tmp_path / "corpus"
    write_corpus(source, {"d": 30})
    out = {"same": source, "inside": source / "d" / "mds", "around": tmp_path}[where]
    before = digest(tmp_path)
    with caplog.at_level(logging.ERROR):
        code = script("prepare_data").main(prepare_args(source, tiny_tokenizer, out, "--overwrite"))
    assert code == 2
    assert f"--out {out} {relation} --input {source}" in caplog.text
    assert digest(tmp_path) == before


def test_out_equal_to_input_on_the_command_line_has_no_traceback(tmp_path, tiny_tokenizer):  # noqa: F811
    source = tmp_path / "corpus"
    write_corpus(source, {"d": 30})
    before = digest(tmp_path)
    done = subprocess.run([sys.executable, "scripts/prepare_data.py",
                           *prepare_args(source, tiny_tokenizer, source, "--overwrite")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--out {source} is --input {source}" in done.stderr
    assert digest(tmp_path) == before


# --- prepare_data: truncated or corrupt compressed inputs ---------------------------------------------------------

def _compressed_corpus(root: Path, suffix: str, damage: str) -> tuple[Path, int]:
    """Domain ``d`` of two files: a good plain one and a damaged compressed one; returns it and the good count."""
    write_corpus(root, {"d": 60}, docs_per_file=30)
    good, second = sorted((root / "d").glob("*.jsonl"))
    raw = second.read_bytes()
    packed = gzip.compress(raw) if suffix == ".gz" else zstandard.ZstdCompressor().compress(raw)
    damaged = second.with_name(second.name + suffix)
    damaged.write_bytes(packed[: len(packed) // 2] if damage == "truncated" else b"\x1f\x8b garbage" + packed[20:])
    second.unlink()
    return damaged, len(good.read_text().splitlines())


@pytest.mark.parametrize(("suffix", "damage"), [(".zst", "truncated"), (".gz", "truncated"), (".gz", "garbage")])
def test_damaged_compressed_file_strict_is_an_error_naming_it(tmp_path, tiny_tokenizer, caplog, suffix, damage):  # noqa: F811
    damaged, _ = _compressed_corpus(tmp_path / "in", suffix, damage)
    before = digest(tmp_path)
    with caplog.at_level(logging.ERROR):
        code = script("prepare_data").main(prepare_args(tmp_path / "in", tiny_tokenizer, tmp_path / "out", "--strict"))
    assert code == 2 and f"{damaged}: truncated or corrupt compressed stream" in caplog.text
    assert digest(tmp_path) == before


def test_truncated_file_in_a_worker_process_is_named(tmp_path, tiny_tokenizer):  # noqa: F811
    damaged, _ = _compressed_corpus(tmp_path / "in", ".zst", "truncated")
    with pytest.raises(ValueError, match=f"^{damaged}: truncated or corrupt compressed stream"):
        prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "out", seq_len=16, eval_seqs=1, strict=True, workers=2,
                progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".zst", ".gz"])
def test_damaged_compressed_file_lenient_is_skipped_and_reported(tmp_path, tiny_tokenizer, capsys, suffix):  # noqa: F811
    damaged, good = _compressed_corpus(tmp_path / "in", suffix, "truncated")
    code = script("prepare_data").main(prepare_args(tmp_path / "in", tiny_tokenizer, tmp_path / "out"))
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    skipped = summary["skipped_files"][str(damaged)]
    assert code == 0 and line["skipped_files"] == {str(damaged): skipped["documents"]}
    assert 0 <= skipped["documents"] < 30 and str(damaged) in skipped["reason"]
    assert summary["domains"]["d"]["documents"] == good  # only the intact file's documents: no silent partial file


def test_cut_zstd_stream_is_never_read_as_complete(tmp_path):
    """The case that lost documents silently: a large file cut after its first blocks."""
    from llmshear.datasets.jsonl import BadLines, CorruptFileError, read_documents

    lines = [json.dumps({"text": f"document {i} " + "words " * 40}) for i in range(6000)]
    packed = zstandard.ZstdCompressor().compress("\n".join(lines).encode())
    path = tmp_path / "big.jsonl.zst"
    path.write_bytes(packed[: len(packed) // 3])
    read = []
    with pytest.raises(CorruptFileError, match=f"^{path}: truncated or corrupt compressed stream after line"):
        read.extend(read_documents(path, BadLines()))
    assert 0 < len(read) < len(lines)
    path.write_bytes(packed + zstandard.ZstdCompressor().compress(b"\n" + lines[0].encode()))  # two whole frames
    assert len(list(read_documents(path, BadLines()))) == len(lines) + 1


# --- data vocabulary against the model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer):  # noqa: F811
    """The recipe domains tokenized by the 300-token tokenizer, 32-token sequences (written once)."""
    root = tmp_path_factory.mktemp("prepared")
    write_corpus(root / "in", {name: 150 for name in DOMAINS})
    summary = prepare(root / "in", tiny_tokenizer, root / "out", seq_len=SEQ, eval_seqs=2, progress=False)
    return root / "out", summary


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_data_beyond_the_model_vocabulary_is_a_config_error(tmp_path, prepared):
    data, summary = prepared
    model_vocab = load_config("tiny-gqa").vocab_size
    top = summary["domains"]["alpha"]["max_token_id"]
    assert top >= model_vocab  # precondition: the 300-token tokenizer's ids exceed tiny-gqa's vocabulary
    before = digest(data)
    with pytest.raises(ConfigError) as caught:
        load(tiny_recipe(tmp_path, data))
    text = str(caught.value)
    assert f"data.path: domain 'alpha' holds token ids up to {top}, model 'tiny-gqa' has a vocabulary of " \
           f"{model_vocab}" in text and f"vocabulary {summary['vocab_size']}" in text
    assert train.main([str(tiny_recipe(tmp_path, data, run="again"))]) == 2
    assert digest(data) == before and not (tmp_path / "again").exists()


def _model_dir(root: Path, vocab: int, tokenizer: Path | None) -> Path:
    """An HF directory with tiny-gqa's shape, ``vocab`` entries, and ``tokenizer``'s tokenizer.json."""
    cfg = load_config("tiny-gqa")
    cfg.vocab_size = vocab
    config_to_hf(cfg).save_pretrained(root)
    if tokenizer is not None:
        (root / "tokenizer.json").write_bytes((tokenizer / "tokenizer.json").read_bytes())
    return root


def test_another_tokenizer_with_fitting_ids_is_a_config_error(tmp_path, prepared, tiny_tokenizer):  # noqa: F811
    data, summary = prepared
    same = _model_dir(tmp_path / "same", 512, tiny_tokenizer)
    assert load(tiny_recipe(tmp_path, data, run="ok", model={"pretrained": str(same)})).data.path == str(data)
    other_tokenizer = tmp_path / "other_tok"
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)} | {"<eos>": 300, "[UNK]": 301},
                                       unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<eos>").save_pretrained(other_tokenizer)
    foreign = _model_dir(tmp_path / "foreign", 512, other_tokenizer)
    with pytest.raises(ConfigError, match=r"whose token table differs from the tokenizer.json of model"):
        load(tiny_recipe(tmp_path, data, run="bad", model={"pretrained": str(foreign)}))


@pytest.mark.parametrize(("name", "flag"), [("eval_ppl", "--model"), ("reference_loss", "--source")])
def test_scripts_refuse_data_of_another_vocabulary(prepared, caplog, capsys, name, flag):
    data, summary = prepared
    before = digest(data)
    with caplog.at_level(logging.ERROR):
        code = script(name).main([flag, "tiny-gqa", "--data", str(data / "eval")])
    assert code == 2 and "domain 'alpha' holds token ids up to" in caplog.text
    assert f"--data {data / 'eval'} does not fit {flag} tiny-gqa" in caplog.text
    assert capsys.readouterr().out == "" and digest(data) == before


# --- shards that contradict their index ---------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_damaged_shard_is_a_config_error_naming_domain_and_shard(tmp_path, damage):
    data = write_mds(tmp_path / "data", DOMAINS, SEQ, n_train=16, n_eval=2)
    shard = sorted((data / "train" / "beta").glob("shard.*.mds"))[0]
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\xff" * 8 + raw[8:])
    recipe = tiny_recipe(tmp_path, data)
    before = digest(tmp_path)
    with pytest.raises(ConfigError, match=f"data.path: domain 'beta': shard {shard}"):
        load(recipe)
    assert train.main([str(recipe)]) == 2
    assert digest(tmp_path) == before


def _damage_offsets(shard: Path, sample: int) -> None:
    """Overwrite sample ``sample``'s end offset (its header passes the cheap open-time check)."""
    raw = bytearray(shard.read_bytes())
    raw[4 * (sample + 2): 4 * (sample + 3)] = np.uint32(7).tobytes()
    shard.write_bytes(bytes(raw))


def test_damaged_sample_names_domain_shard_and_sample_when_read(tmp_path):
    data = write_mds(tmp_path / "data", DOMAINS, SEQ, n_train=16, n_eval=2)
    shard = sorted((data / "train" / "gamma").glob("shard.*.mds"))[0]
    _damage_offsets(shard, 3)
    domain = MDSDomain(data / "train" / "gamma")
    assert len(domain[2]) == SEQ
    with pytest.raises(ShardError, match=f"domain 'gamma': shard {shard}: sample 3 .* cannot be read"):
        domain[3]


def test_garbage_token_bytes_are_named_when_read(tmp_path, prepared):
    data = _copy(prepared[0], tmp_path / "data")
    domain = MDSDomain(data / "train" / "beta")
    shard = data / "train" / "beta" / domain.shards[0].raw_data.basename
    raw = bytearray(shard.read_bytes())
    begin, end = np.frombuffer(bytes(raw[4 * 3: 4 * 5]), np.uint32).tolist()  # sample 2's bytes
    raw[begin:end] = b"\xff" * (end - begin)
    shard.write_bytes(bytes(raw))
    damaged = MDSDomain(data / "train" / "beta")  # size and header are intact: opening passes
    assert len(damaged[1]) == SEQ
    with pytest.raises(ShardError, match=f"domain 'beta': shard {shard}: sample 2 .*cannot be read: token id 65535 "
                                         f"above the largest, {prepared[1]['domains']['beta']['max_token_id']}"):
        damaged[2]


def _garble_first_samples(split: Path) -> None:
    """Overwrite the token bytes of every domain's first sample in ``split`` with 0xFF (header intact)."""
    for shard in split.rglob("shard.*.mds"):
        raw = bytearray(shard.read_bytes())
        begin, end = np.frombuffer(bytes(raw[4:12]), np.uint32).tolist()  # sample 0's start and end
        raw[begin:end] = b"\xff" * (end - begin)
        shard.write_bytes(bytes(raw))


def test_garbage_token_bytes_without_a_summary_are_named_and_leave_no_run_folder(tmp_path, caplog):
    data = write_mds(tmp_path / "data", DOMAINS, 32, n_train=16, n_eval=2)
    assert not (data / "summary.json").exists()  # nothing records the largest token id: the model's vocab bounds it
    _garble_first_samples(data / "train")
    (tmp_path / "runs").mkdir()
    recipe = tiny_recipe(tmp_path / "runs", data, checkpoint={"save_folder": str(tmp_path / "runs" / "a" / "b")})
    with caplog.at_level(logging.ERROR):
        assert train.main([str(recipe)]) == 2
    vocab = load_config("tiny-gqa").vocab_size
    assert re.search(rf"domain '\w+': shard \S+/train/\w+/shard\.00000\.mds: sample 0 \(sample 0 of the domain\) "
                     rf"cannot be read: token id 65535 above the largest, {vocab - 1}, that the model's vocabulary of "
                     rf"{vocab} holds", caplog.text), caplog.text
    assert [p.name for p in (tmp_path / "runs").rglob("*")] == ["run.yaml"]  # the folders the run made: gone
    with pytest.raises(ShardError, match="token id 65535 above the largest, 9"):
        MDSDomain(data / "train" / "alpha", vocab_size=10)[0]
    assert MDSDomain(data / "train" / "alpha")[0].max() == 65535  # no bound known: read as it is


def test_damaged_sample_mid_run_stops_train_with_its_name(tmp_path, caplog):
    data = write_mds(tmp_path / "data", DOMAINS, SEQ, n_train=16, n_eval=2)
    for name in DOMAINS:
        _damage_offsets(sorted((data / "train" / name).glob("shard.*.mds"))[0], 5)
    recipe = tiny_recipe(tmp_path, data, prune=False, train={"max_batches": 40})
    load(recipe)  # the damage passes the config-time check
    with caplog.at_level(logging.ERROR):
        assert train.main([str(recipe)]) == 2
    # sample 5's end offset is sample 6's start: whichever is drawn first is named
    assert re.search(r"domain '\w+': shard \S+/train/\w+/shard\.00000\.mds: sample ([56]) \(sample \1 of the domain\) "
                     r"cannot be read", caplog.text), caplog.text


# --- separate data for pruning and continued pre-training ----------------------------------------------------------

def _stage_ranges(repo: Path, stage_files: tuple[str, str]) -> list[list[float]]:
    from omegaconf import OmegaConf

    return [list(OmegaConf.load(repo / "yaml" / f)["data"]["train_range"]) for f in stage_files]


@pytest.mark.parametrize("stages", [("prune_1.3b.yaml", "continue_1.3b.yaml"),
                                    ("prune_2.7b.yaml", "continue_2.7b.yaml"),
                                    ("demo/prune.yaml", "demo/continue.yaml")])
def test_pruning_and_continued_pretraining_read_disjoint_samples(tmp_path, stages):
    prune_range, continue_range = _stage_ranges(REPO, stages)
    assert prune_range[1] <= continue_range[0], "the shipped recipes give each stage its own part"
    sizes = {"alpha": 150, "beta": 120, "gamma": 400}  # the 2% of the paper recipes holds a few samples
    for i, (name, n) in enumerate(sizes.items()):  # sample j of domain i holds the token 1000 i + j everywhere
        write_shards(tmp_path / "train" / name, np.full((n, 4), i * 1000) + np.arange(n)[:, None])
    drawn = []
    for train_range in (prune_range, continue_range):
        loader = build_train_dataloader([tmp_path / "train" / d for d in sizes], list(sizes), [0.2, 0.3, 0.5],
                                        batch_size=8, seed=5, rank=0, world_size=1, train_range=train_range)
        stream = iter(loader)
        drawn.append({int(x) for _ in range(60) for x in next(stream)["input_ids"][:, 0]})
    assert drawn[0] and drawn[1] and not drawn[0] & drawn[1]
    for i, n in enumerate(sizes.values()):  # each stage reads exactly its part (every sample of it, over passes)
        for train_range, seen in zip((prune_range, continue_range), drawn, strict=True):
            start, stop = part_bounds(n, train_range)
            assert {x - i * 1000 for x in seen if i * 1000 <= x < (i + 1) * 1000} <= set(range(start, stop))


def test_eval_split_is_disjoint_from_training(tmp_path, prepared):
    data, _ = prepared
    domains = {split: MDSDomain(data / split / "alpha") for split in ("train", "eval")}
    rows = {split: {d[i].tobytes() for i in range(len(d))} for split, d in domains.items()}
    assert rows["eval"] and not rows["eval"] & rows["train"]
    with pytest.raises(ConfigError, match=r"data.eval_split='train' is data.train_split"):
        load(tiny_recipe(tmp_path, write_mds(tmp_path / "d", DOMAINS, SEQ), data={"eval_split": "train"}))


@pytest.mark.parametrize(("value", "message"), [
    ("[0.5,0.2]", "data.train_range=[0.5, 0.2] must be [begin, end] with 0 <= begin < end <= 1"),
    ("[0.0,1.5]", "data.train_range=[0.0, 1.5] must be [begin, end]"),
    ("[0.0,0.01]", "data.train_range=[0.0, 0.01] selects no sample of domain 'alpha' (4 train sequences)"),
])
def test_bad_train_range_names_its_key(tmp_path, value, message):
    data = write_mds(tmp_path / "data", DOMAINS, SEQ, n_train=4, n_eval=2)
    with pytest.raises(ConfigError) as caught:
        load(tiny_recipe(tmp_path, data), [f"data.train_range={value}"])
    assert message in str(caught.value)


# --- RedPajama as it is published ------------------------------------------------------------------------------------

def _lines(texts: list[str], **extra) -> str:
    return "".join(json.dumps({"text": t, **extra}) + "\n" for t in texts)


def _docs(prefix: str, n: int) -> list[str]:
    return [f"{prefix} document {i}: " + "alpha beta gamma delta " * 6 for i in range(n)]


def test_redpajama_1t_folders_and_sample_files_map_to_the_recipe_domains(tmp_path, tiny_tokenizer, caplog):  # noqa: F811
    folders = {"arxiv": "arxiv/arxiv_0a.jsonl", "book": "book/book.jsonl", "c4": "c4/c4-train.00000-of-01024.jsonl",
               "common_crawl": "common_crawl/2019-30/en_head_0000.json.gz.dedup.classifier.jsonl.zst",
               "github": "github/filtered_0b.sampled.jsonl", "stackexchange": "stackexchange/stackexchange.jsonl",
               "wikipedia": "wikipedia/wiki.jsonl"}
    sample = {"arxiv": "arxiv_sample.jsonl", "book": "book_sample.jsonl", "c4": "c4_sample.jsonl",
              "common_crawl": "cc_2019-30_sample.jsonl", "github": "github_sample.jsonl",
              "stackexchange": "stackexchange_sample.jsonl", "wikipedia": "wikipedia_sample.jsonl"}
    ours = {"arxiv": "arxiv", "book": "book", "c4": "c4-rp", "common_crawl": "cc", "github": "github",
            "stackexchange": "stackexchange", "wikipedia": "wiki"}
    for layout, names in (("1t", folders), ("sample", sample)):
        for i, (source, relative) in enumerate(names.items()):
            path = tmp_path / layout / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            text = _lines(_docs(source, 20 + i)).encode()
            path.write_bytes(zstandard.ZstdCompressor().compress(text) if path.suffix == ".zst" else text)
        summary = prepare(tmp_path / layout, tiny_tokenizer, tmp_path / f"{layout}_out", seq_len=16, eval_seqs=1,
                          layout="redpajama", progress=False)
        assert list(summary["domains"]) == sorted(ours.values())
        for i, source in enumerate(names):
            assert summary["domains"][ours[source]]["documents"] == 20 + i
    with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError, match="domain 'common_crawl'"):
        prepare(tmp_path / "1t", tiny_tokenizer, tmp_path / "default_out", seq_len=16, eval_seqs=1)  # default layout
    assert "--layout redpajama maps them" in caplog.text and "'c4', 'common_crawl', 'wikipedia'" in caplog.text


def test_documents_naming_their_set_are_routed_by_it(tmp_path, tiny_tokenizer, caplog):  # noqa: F811
    sets = {"RedPajamaCommonCrawl": "cc", "RedPajamaC4": "c4-rp", "RedPajamaGithub": "github", "RedPajamaBook": "book",
            "RedPajamaArXiv": "arxiv", "RedPajamaWikipedia": "wiki", "RedPajamaStackExchange": "stackexchange"}
    (tmp_path / "slim" / "train" / "chunk1").mkdir(parents=True)
    mixed = "".join(_lines(_docs(name, 1), meta={"redpajama_set_name": name}) for _ in range(12) for name in sets)
    mixed += _lines(["no set here " * 5]) + _lines(["odd set " * 5], meta={"redpajama_set_name": "RedPajamaNope"})
    path = tmp_path / "slim" / "train" / "chunk1" / "example_train_0.jsonl"
    path.write_text(mixed)
    summary = prepare(tmp_path / "slim", tiny_tokenizer, tmp_path / "out", seq_len=16, eval_seqs=1,
                      layout="redpajama", domains=["wiki", "cc"], progress=False)
    assert list(summary["domains"]) == ["wiki", "cc"]
    assert all(summary["domains"][d]["documents"] == 12 for d in ("wiki", "cc"))
    assert summary["unselected_documents"] == {d: 12 for d in sets.values() if d not in ("wiki", "cc")}
    reasons = [e.split(": ", 1)[1] for e in summary["bad_line_files"][str(path)]["examples"]]
    assert summary["bad_lines"] == 2 and reasons == [
        "no meta.redpajama_set_name and the file's name or folder names no RedPajama source",
        "unknown meta.redpajama_set_name 'RedPajamaNope'"]
    with pytest.raises(ValueError, match="--domains c4: not RedPajama domains"):
        prepare(tmp_path / "slim", tiny_tokenizer, tmp_path / "out2", seq_len=16, eval_seqs=1, layout="redpajama",
                domains=["c4"])



# --- paths that escape ----------------------------------------------------------------------------------------------

def test_links_that_lead_nowhere_are_refused_by_name(tmp_path, tiny_tokenizer):  # noqa: F811
    write_corpus(tmp_path / "in", {"alpha": 20, "beta": 20})
    (tmp_path / "in" / "gamma").symlink_to(tmp_path / "moved-away")  # a domain folder that was moved
    with pytest.raises(FileNotFoundError, match=r"in/gamma is a link to .*moved-away, which does not exist"):
        prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "out", seq_len=16, eval_seqs=1, progress=False)
    (tmp_path / "in" / "gamma").unlink()
    (tmp_path / "in" / "beta" / "loop.jsonl").symlink_to(tmp_path / "in" / "beta" / "loop.jsonl")
    with pytest.raises(FileNotFoundError, match=r"beta/loop.jsonl is a link to .*, which does not exist \(or loops\)"):
        prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "out", seq_len=16, eval_seqs=1, progress=False)
    (tmp_path / "in" / "beta" / "loop.jsonl").unlink()
    (tmp_path / "in" / "gamma").symlink_to(tmp_path / "in" / "alpha")  # a link that resolves is followed
    summary = prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "out", seq_len=16, eval_seqs=1, progress=False)
    assert set(summary["domains"]) == {"alpha", "beta", "gamma"}
    with pytest.raises(ValueError, match=r"--domains '../in/alpha': a domain is a plain folder name"):
        prepare(tmp_path / "in", tiny_tokenizer, tmp_path / "out2", seq_len=16, eval_seqs=1, progress=False,
                domains=["alpha", "../in/alpha"])


def test_a_domain_that_is_a_path_is_a_config_error(tmp_path):
    data = write_mds(tmp_path / "data", DOMAINS, SEQ)
    with pytest.raises(ConfigError) as err:
        load(tiny_recipe(tmp_path, data), ["data.domains=[alpha,beta,../eval/gamma]"])
    assert any("data.domains: '../eval/gamma' is not a plain name" in p for p in err.value.problems)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_byte_order_mark_does_not_cost_the_first_document(tmp_path, suffix):
    """Editors on Windows save UTF-8 with a byte-order mark, which json.loads refuses: the first line was a bad line."""
    content = ("\ufeff" + "\n".join(json.dumps({"text": t}) for t in ["first", "second"]) + "\n").encode("utf-8")
    path = tmp_path / f"docs{suffix}"
    path.write_bytes(gzip.compress(content) if suffix.endswith(".gz") else content)
    bad = BadLines()
    assert list(read_documents(path, bad)) == ["first", "second"] and bad.count == 0
    middle = tmp_path / "middle.jsonl"  # a mark before a later line is no first line's: that line stays bad
    middle.write_bytes(content.replace(b"\n", b"\n\xef\xbb\xbf", 1))
    bad = BadLines()
    assert list(read_documents(middle, bad)) == ["first"] and bad.count == 1 and "BOM" in bad.examples[0]


def test_a_shard_replaced_after_the_domain_opened_is_refused_not_read(tmp_path):
    """A data root re-prepared while a run reads it: shards of the same size hold other samples. A shard the run
    has not read yet is refused by name; one already mapped keeps its samples; a touched shard is still read."""
    rows = np.repeat(np.arange(64)[:, None], 8, axis=1)
    write_shards(tmp_path / "alpha", rows, size_limit=1 << 8)
    domain = MDSDomain(tmp_path / "alpha")
    assert len(domain.shards) >= 3
    first, last = domain[0].tolist(), len(domain) - 1
    again = tmp_path / "again"
    write_shards(again, rows[::-1].copy(), size_limit=1 << 8)  # same sizes, other samples: as a re-preparation
    moved = tmp_path / "alpha.old"
    (tmp_path / "alpha").rename(moved)
    again.rename(tmp_path / "alpha")
    with pytest.raises(ShardError, match=r"shard .*alpha/shard\.\d+\.mds was replaced after this run opened"):
        domain[last]
    assert domain[0].tolist() == first  # mapped before the replacement: the file the run opened
    fresh = MDSDomain(tmp_path / "alpha")
    shard = tmp_path / "alpha" / fresh.shards[-1].raw_data.basename
    os.utime(shard, (1, 1))
    assert fresh[last].tolist() == rows[0].tolist()
