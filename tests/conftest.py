"""Shared fixtures: repository paths, the RedPajama sample (skipped when absent) and the embedded SmolLM2."""

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
