"""Fixtures of the fault-injection tests: two small good slides, and a store finished from one."""

from __future__ import annotations

import pytest
import xarray as xr

from nic_pipeline.synth import write_synthetic_slide
from tests.faults.helpers import nic

SIZE = 2048  # px per side: 16 x 16 cells of the NIC grid, 4 blocks of 8 x 8 cells
BLOCK = "8"


def features(store, slide_id: str):
    """A slide's codes as stored, read straight from its own metadata."""
    return xr.open_zarr(store, group=slide_id, consolidated=False, zarr_format=3)["features"].values


@pytest.fixture(scope="package")
def good_slides(tmp_path_factory):
    """Two synthetic slides as `nic synth` writes them, 2048 px square at 0.5 µm/px."""
    folder = tmp_path_factory.mktemp("good")
    for seed in (1, 2):
        write_synthetic_slide(folder / f"good{seed}.tif", SIZE, SIZE, mpp=0.5, seed=seed)
    return [folder / "good1.tif", folder / "good2.tif"]


@pytest.fixture(scope="package")
def finished_store(tmp_path_factory, good_slides):
    """`nic compress good1.tif --block 8` into a fresh store: (store, its clean codes)."""
    store = tmp_path_factory.mktemp("finished") / "clean.zarr"
    done = nic("compress", good_slides[0], "--out", store, "--workers", "2", "--block", BLOCK)
    assert done.returncode == 0, done.stderr
    return store, features(store, "good1")
