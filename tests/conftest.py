"""Test-session setup: one embedded corpus for the whole session, built once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers`, also in spawned workers

import torch

# Without CUDA DeepSpeed must use its CPU accelerator; set before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory) -> Path:
    """The embedded corpus is built into a session directory (shared by subprocesses via env)."""
    cache = os.environ.get("PRETRAIN_TEST_CACHE") or str(tmp_path_factory.mktemp("corpus-cache"))
    os.environ["PRETRAIN_CACHE"] = cache
    return Path(cache)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
