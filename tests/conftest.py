"""Shared test fixtures: the real data beside the checkout, GPU detection, synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NIC_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
MODELS = SHARED / "models"


def _has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


HAS_GPU = _has_gpu()


@pytest.fixture(autouse=True, scope="session")
def no_warm_cluster(tmp_path_factory):
    """No test runs on a warm cluster its developer left running (`nic cluster start`): the
    warm-cluster file is one that does not exist, unless a test names its own."""
    previous = os.environ.get("NIC_CLUSTER_FILE")
    os.environ["NIC_CLUSTER_FILE"] = str(tmp_path_factory.mktemp("no-warm-cluster") / "cluster.json")
    yield
    if previous is None:
        os.environ.pop("NIC_CLUSTER_FILE", None)
    else:
        os.environ["NIC_CLUSTER_FILE"] = previous


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when the real data is absent."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


def shared_model(*parts: str) -> Path:
    """A path under ../shared/models, or skip when absent."""
    path = MODELS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"released model not available: {path}")
    return path
