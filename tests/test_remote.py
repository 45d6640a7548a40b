"""``checkpoint.remote``: a run folder mirrored to S3 (moto's in-process mock), a resume on a machine without the
folder, exports from the bucket, the background upload, and the errors. Several ranks: test_sharded_checkpoints."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import boto3
import pytest
import torch
import torch.distributed.checkpoint as dcp
from moto import mock_aws
from recipe_fixtures import DOMAINS, assert_same_state, final_state, tiny_recipe, write_mds
from script_modules import script

from llmshear import run as train
from llmshear.callbacks.run_folder import MirrorRunFolder
from llmshear.config import ConfigError, load
from llmshear.remote import Remote, RemoteError, local_checkpoint

SETTINGS = {"train": {"max_batches": 4, "eval_interval": 2}, "checkpoint": {"save_interval": 2},
            "pruning": {"eval_target": False}}  # one evaluator is all these tests need
RESUME = ["checkpoint.autoresume=true", "train.max_batches=6"]


@pytest.fixture(scope="module")
def bucket():
    """A mocked S3 with the bucket ``bucket``, for the whole module."""
    with pytest.MonkeyPatch.context() as env, mock_aws():
        for name in ("S3_ENDPOINT_URL", "AWS_PROFILE"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="bucket")
        yield client


def objects(client, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket="bucket", Prefix=prefix).get("Contents", [])
    return {o["Key"].removeprefix(prefix): client.get_object(Bucket="bucket", Key=o["Key"])["Body"].read()
            for o in listed}


def run_main(caplog, recipe: Path, *args: str) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = train.main([str(recipe), *args])
    return status, caplog.text


@pytest.fixture(scope="module")
def runs(bucket, tmp_path_factory):
    """The same 4-batch pruning run, continued to 6, once in a local folder and once mirrored to s3://bucket/run
    (its folder deleted before the continuation); the bucket's objects after the first 4 batches."""
    tmp = tmp_path_factory.mktemp("remote")
    data = write_mds(tmp / "data", DOMAINS, 32, n_train=8)
    local = tiny_recipe(tmp, data, run="local", **SETTINGS)
    mirrored = tiny_recipe(tmp, data, run="mirrored", **{**SETTINGS, "checkpoint": {
        **SETTINGS["checkpoint"], "remote": "s3://bucket/run"}})
    for recipe in (local, mirrored):
        assert train.main([str(recipe)]) == 0
    after_four = objects(bucket, "run/")
    shutil.rmtree(tmp / "mirrored")
    return {"tmp": tmp, "data": data, "local": local, "mirrored": mirrored, "after_four": after_four}


def test_a_mirrored_run_resumes_from_the_bucket_bit_identical(runs, bucket, caplog):
    tmp, after_four = runs["tmp"], runs["after_four"]
    assert after_four["latest"] == b"ep0-ba4-rank0.pt\n"
    assert {"ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt", "metrics.jsonl", "proportions.json", "masks/ba2.pt",
            "masks/ba2.json", "masks/ba4.pt", "masks/ba4.json"} <= set(after_four)
    assert not {name for name in after_four if name in ("run.lock", "latest-rank0.pt") or name.startswith(".")}

    assert train.main([str(runs["local"]), *RESUME]) == 0
    status, text = run_main(caplog, runs["mirrored"], *RESUME)
    assert status == 0, text
    assert "downloaded s3://bucket/run/ep0-ba4-rank0.pt" in text
    folder, reference = tmp / "mirrored", tmp / "local"
    assert_same_state(final_state(reference), final_state(folder))
    assert (folder / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert sorted(p.name for p in (folder / "masks").rglob("*")) == sorted(
        p.name for p in (reference / "masks").rglob("*"))
    assert not (folder / "ep0-ba2-rank0.pt").exists()  # only the checkpoint resumed from is downloaded

    after_six = objects(bucket, "run/")
    assert after_six["latest"] == b"ep0-ba6-rank0.pt\n"
    for name in ("ep0-ba6-rank0.pt", "metrics.jsonl", "proportions.json", "masks/ba6.json"):
        assert after_six[name] == (folder / name).read_bytes(), name
    assert after_six["ep0-ba2-rank0.pt"] == after_four["ep0-ba2-rank0.pt"]  # the remote keeps every checkpoint


def test_exports_from_the_bucket_match_the_local_ones(runs, bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the downloads go, to see them removed
    export = script("export_hf").main
    local, uri = runs["tmp"] / "local" / "ep0-ba4-rank0.pt", "s3://bucket/run/ep0-ba4-rank0.pt"
    assert export(["--checkpoint", str(local), "--out", str(tmp_path / "local")]) == 0
    assert export(["--checkpoint", uri, "--out", str(tmp_path / "remote")]) == 0
    assert_same_export(tmp_path / "local", tmp_path / "remote", uri)

    plain = tiny_recipe(runs["tmp"], runs["data"], run="plain", prune=False, train={"max_batches": 2,
                        "eval_interval": 2}, checkpoint={"remote": "s3://bucket/plain"})
    assert train.main([str(plain)]) == 0
    export = script("export_hf").main
    checkpoint = runs["tmp"] / "plain" / "ep0-ba2-rank0.pt"
    assert export(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "plain_local")]) == 0
    uri = "s3://bucket/plain"  # a run's prefix: its newest checkpoint
    assert export(["--checkpoint", uri, "--out", str(tmp_path / "plain_remote")]) == 0
    assert_same_export(tmp_path / "plain_local", tmp_path / "plain_remote", uri)
    assert not list(tmp_path.glob("llmshear-checkpoint-*"))


def assert_same_export(local: Path, remote: Path, uri: str) -> None:
    """The same files and bytes, except that the summary (and the card) name the checkpoint as given."""
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in remote.iterdir())
    for name in names:
        if name not in ("summary.json", "README.md"):
            assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (local, remote))
    assert theirs["stages"][-1].pop("checkpoint") == uri
    ours["stages"][-1].pop("checkpoint")
    assert ours["perplexity"] is not None
    assert {k: v for k, v in ours.items() if k not in ("out", "command")} == {
        k: v for k, v in theirs.items() if k not in ("out", "command")}


def problems_of(recipe: Path, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(recipe, list(overrides))
    return info.value.problems


def test_unusable_remotes_are_config_errors_naming_the_key(runs, bucket, tmp_path, caplog):
    recipe = tiny_recipe(tmp_path, runs["data"], run="bad", **SETTINGS)
    for uri, why in [("gs://bucket/run", "must be s3://bucket/prefix"), ("runs/mirror", "must be s3://bucket/prefix"),
                     ("s3://missing/run", "listing bucket 'missing' failed: NoSuchBucket")]:
        problems = problems_of(recipe, f"checkpoint.remote={uri}")
        assert any(f"checkpoint.remote={uri!r}: {why}" in p for p in problems), problems
    problems = problems_of(recipe, "checkpoint.remote=s3://bucket/run")  # a run's checkpoints, no autoresume
    assert any("checkpoint.remote='s3://bucket/run' already holds checkpoints" in p for p in problems), problems

    status, text = run_main(caplog, recipe, "checkpoint.remote=s3://missing/run", "checkpoint.autoresume=true")
    assert status == 2 and "checkpoint.remote='s3://missing/run'" in text and "Traceback" not in text
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "out"
    assert script("export_hf").main(["--checkpoint", "s3://missing/run", "--out", str(out)]) == 2
    assert script("export_hf").main(["--checkpoint", "s3://bucket/run/ep0-ba8-rank0.pt", "--out", str(out)]) == 2
    assert "--checkpoint='s3://bucket/run/ep0-ba8-rank0.pt': no such object" in caplog.text
    assert not out.exists() or not any(out.iterdir())


def test_missing_credentials_are_a_config_error(runs, bucket, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    recipe = tiny_recipe(tmp_path, runs["data"], run="nocreds", **SETTINGS)
    problems = problems_of(recipe, "checkpoint.remote=s3://bucket/other")
    assert any("checkpoint.remote='s3://bucket/other': listing bucket 'bucket' failed: NoCredentialsError" in p
               for p in problems), problems


def test_uploads_go_in_the_background_one_at_a_time_and_survive_a_rotation(bucket, tmp_path, monkeypatch):
    """The training thread hands a checkpoint to the upload thread and goes on; the next checkpoint waits for it;
    a checkpoint deleted locally (``checkpoint.keep``) during its upload is still uploaded whole (hard link)."""
    folder = tmp_path / "run"
    folder.mkdir()
    first, second = folder / "ep0-ba2-rank0.pt", folder / "ep0-ba4-rank0.pt"
    release, started = threading.Event(), threading.Event()
    upload = Remote.upload

    def held(self, path, name):
        if name == first.name:
            started.set()
            assert release.wait(30)
        upload(self, path, name)

    monkeypatch.setattr(Remote, "upload", held)
    callback = MirrorRunFolder(folder, "s3://bucket/background")
    callback.fit_start(None, None)
    torch.save({"state": {"model": {"w": torch.arange(1000.0)}}}, first)
    content = first.read_bytes()
    callback.batch_checkpoint(None, None)  # returns while the upload is held
    assert started.wait(30)
    first.unlink()  # rotated away while uploading
    torch.save({"state": {"model": {"w": torch.zeros(3)}}}, second)
    waiting = threading.Thread(target=callback.batch_checkpoint, args=(None, None))
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive()  # the next checkpoint waits for the upload in flight
    release.set()
    waiting.join(30)
    callback.close(None, None)
    stored = objects(bucket, "background/")
    assert stored["ep0-ba2-rank0.pt"] == content
    assert stored["ep0-ba4-rank0.pt"] == second.read_bytes()
    assert stored["latest"] == b"ep0-ba4-rank0.pt\n"
    assert not (folder / ".uploading-rank0").exists()


def _sharded(directory: Path, value: float) -> Path:
    """A one-shard checkpoint directory (``__0_0.distcp`` + ``.metadata``) as torch.distributed.checkpoint writes."""
    state = {"state": {"model": {"w": torch.full((4,), value)}}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)
    return directory


def test_a_marker_naming_a_checkpoint_with_a_missing_shard_is_passed_over(bucket, tmp_path, caplog):
    """Resume and export take the newest checkpoint whose every shard is in the store, whatever the marker says."""
    remote = Remote("s3://bucket/partial")
    for batch, files in ((2, ("__0_0.distcp", ".metadata")), (4, (".metadata",))):  # batch 4: its shard missing
        directory = _sharded(tmp_path / f"ep0-ba{batch}", float(batch))
        for name in files:
            remote.upload(directory / name, f"ep0-ba{batch}/{name}")
    (tmp_path / "latest").write_text("ep0-ba4\n")
    remote.upload(tmp_path / "latest", "latest")
    names = remote.names()
    assert remote.missing("ep0-ba4", names) == ["ep0-ba4/__0_0.distcp"]
    with caplog.at_level(logging.WARNING):
        assert remote.newest_checkpoint(names) == "ep0-ba2"
    assert "names 'ep0-ba4', which is not complete there" in caplog.text
    with local_checkpoint("s3://bucket/partial") as path:
        assert path.name == "ep0-ba2" and (path / "__0_0.distcp").is_file()
    with pytest.raises(RemoteError, match=r"an incomplete checkpoint \(ep0-ba4/__0_0.distcp is not in the store\)"), \
            local_checkpoint("s3://bucket/partial/ep0-ba4"):
        pass


def test_without_hard_links_the_upload_runs_in_the_training_thread(bucket, tmp_path, monkeypatch, caplog):
    """A file system that refuses hard links (some network mounts): no staging, the upload happens at once; a
    staging folder a killed run left behind is cleared, never uploaded."""
    folder = tmp_path / "run"
    (folder / ".uploading-rank0" / "masks").mkdir(parents=True)
    (folder / ".uploading-rank0" / "masks" / "stale.json").write_text("{}")
    callback = MirrorRunFolder(folder, "s3://bucket/nolinks")
    callback.fit_start(None, None)
    torch.save({"state": {"model": {"w": torch.ones(3)}}}, folder / "ep0-ba2-rank0.pt")

    def refuse(source, target):
        raise OSError(errno.EPERM, "Operation not permitted", str(target))

    monkeypatch.setattr(os, "link", refuse)
    with caplog.at_level(logging.WARNING):
        callback.batch_checkpoint(None, None)
    assert "uploading them in the training thread" in caplog.text
    assert callback._job is None  # nothing in the background
    stored = objects(bucket, "nolinks/")
    assert stored["ep0-ba2-rank0.pt"] == (folder / "ep0-ba2-rank0.pt").read_bytes()
    assert stored["latest"] == b"ep0-ba2-rank0.pt\n"
    assert not (folder / ".uploading-rank0").exists() and not any("stale" in name for name in stored)
    callback.close(None, None)
