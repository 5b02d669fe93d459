"""Test-wide settings: offline hubs, quiet wandb, deterministic seeds, GPU tests skipped without CUDA."""

import os

# No network in tests: a missing hub model must fail at once instead of after ~46 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ASSETS_GOOD = SHARED / "assets" / "good"
ASSETS_BAD = SHARED / "assets" / "bad"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Tiny test models are dominated by per-op overhead, which extra threads only add to (and subprocess tests running
# beside the main process would oversubscribe the cores). Tests that want more set it themselves.
torch.set_num_threads(int(os.environ.get("SHAPEE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def assets_good() -> Path:
    if not ASSETS_GOOD.is_dir():
        pytest.skip(f"shared test meshes not found at {ASSETS_GOOD}")
    return ASSETS_GOOD


@pytest.fixture
def assets_bad() -> Path:
    if not ASSETS_BAD.is_dir():
        pytest.skip(f"shared broken meshes not found at {ASSETS_BAD}")
    return ASSETS_BAD
