"""Shared fixtures: repository paths, the RedPajama sample (skipped when absent), the embedded SmolLM2 and an
S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REDPAJAMA = REPO.parent / "shared" / "data" / "redpajama_sample"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def redpajama_dir() -> Path:
    if not REDPAJAMA.is_dir():
        pytest.skip(f"RedPajama sample not found at {REDPAJAMA}")
    return REDPAJAMA


@pytest.fixture(scope="session")
def smollm2():
    """Our ``LlamaLM`` with SmolLM2-135M's real weights (fp32, eval mode), loaded once. Do not modify it."""
    from llmshear.models.hf import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_hf():
    """``transformers``' own ``LlamaForCausalLM`` of the same GGUF (fp32, eval mode), loaded once. Do not modify it."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmshear.sources import resolve_source

    location = resolve_source("smollm2")
    model = AutoModelForCausalLM.from_pretrained(location.directory, gguf_file=location.gguf_file, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def s3(monkeypatch):
    """Moto's S3 server (for runs in other processes) with the bucket ``bucket``, set in this process's environment;
    yields the client and the variables to pass to the processes."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    client.create_bucket(Bucket="bucket")
    yield client, env
    server.stop()
