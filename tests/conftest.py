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
    cache = os.environ.get("PRETRAIN_TEST_CACHE")
    if not cache and os.environ.get("PYTEST_XDIST_WORKER"):  # one cache for all workers (builds take a file lock)
        cache = str(tmp_path_factory.getbasetemp().parent / "corpus-cache")
        os.makedirs(cache, exist_ok=True)
    cache = cache or str(tmp_path_factory.mktemp("corpus-cache"))
    os.environ["PRETRAIN_CACHE"] = cache
    return Path(cache)


def pytest_collection_modifyitems(config, items):
    # Modules with `slow` runs first, then the SLURM/network-namespace group: parallel workers take
    # modules in this order, and a long module started last would leave the other worker idle.
    slow = {module_of(item.nodeid) for item in items if "slow" in item.keywords}

    def rank(item) -> int:
        module = module_of(item.nodeid)
        return 0 if module in slow else 1 if module.endswith(SYSTEM_MODULES) else 2

    items.sort(key=rank)  # stable: the order inside each module is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Parallel runs (pytest-xdist, `-n 2` in pyproject.toml): every test module runs whole on one worker,
# so its module-scoped runs happen once, and the modules that drive the machine's one SLURM
# cluster or its fixed network namespaces run on a single worker, one after another.
SYSTEM_MODULES = ("test_infra_netns.py", "test_infra_slurm.py", "test_multinode.py", "test_slurm_pretrain.py")


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # without pytest-xdist the suite runs serially
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:
    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = module_of(nodeid)
            return "system-modules" if module.endswith(SYSTEM_MODULES) else module

    def pytest_xdist_make_scheduler(config, log):
        if gpu_only(config):  # xdist's own per-test spread (None: the next hook decides)
            return None
        return ModuleScheduling(config, log)


def gpu_only(config) -> bool:
    """A `-m gpu` run (tools/gpu_check.py): its tests build no module-scoped runs worth sharing, and
    one module holds most of them, so they spread test by test over the workers. Whole modules on
    one worker ran them one after another: 320 s on an H100, where the longest test takes 51 s."""
    return config.getoption("markexpr", "").strip() == "gpu"
