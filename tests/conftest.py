"""Test-wide settings (never touch the network, keep torch single-threaded per test worker) and the fixtures the
test folders share. The folders mirror the package: ``selflabel/``, ``data/``, ``training/``, and the top-level
modules' tests here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per test worker, for this process and the ones its tests start (two workers share two cores;
# --cpu_threads auto respects a value set here, as it respects a user's).
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    """A folder for the synthetic shift's generated splits, shared by the tests of one module (generated once)."""
    return tmp_path_factory.mktemp("synthetic_cache")
