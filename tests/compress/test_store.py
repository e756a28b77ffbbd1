"""The Zarr store: layout readable by xarray, block progress, completion, refusing mixed settings."""

import dataclasses

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline.errors import NicError
from pipeline.compress.grid import Grid, iter_blocks
from pipeline.compress.store import (
    COMPLETE,
    CompressionConfig,
    create_slide,
    describe_store,
    done_blocks,
    list_slides,
    mark_complete,
    open_store,
    slide_status,
    source_fingerprint,
    write_block,
)

CONFIG = CompressionConfig(encoder="nic-test", encoder_sha256="abc", code_dim=8, mpp=0.5, patch_size=128,
                           stride=128, block=4)
GRID = Grid(width=128 * 10, height=128 * 6, slide_mpp=0.5, mpp=0.5, patch_size=128, stride=128)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "slide.tif"
    path.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    return source_fingerprint(path)


def test_fingerprint_changes_with_content_and_size(tmp_path):
    path = tmp_path / "a.svs"
    path.write_bytes(b"x" * (3 << 20))
    first = source_fingerprint(path)
    path.write_bytes(b"x" * (3 << 20) + b"y")
    assert source_fingerprint(path)["source_fingerprint"] != first["source_fingerprint"]


def test_slide_group_is_an_xarray_dataset_with_um_coordinates(tmp_path, source):
    root = open_store(tmp_path / "s.zarr", CONFIG)
    tissue = np.zeros(GRID.shape, np.float32)
    tissue[1:3, 2:7] = 1
    group = create_slide(root, "slide", GRID, CONFIG, tissue, source)
    ds = xr.open_zarr(tmp_path / "s.zarr", group="slide", consolidated=False)
    assert ds["features"].dims == ("feature", "y", "x") and ds["features"].dtype == np.float16
    assert ds["features"].shape == (8, 6, 10)
    assert ds["tissue"].dims == ("y", "x")
    np.testing.assert_array_equal(ds["tissue"].values, tissue)
    assert ds["x"].values[:2].tolist() == [32.0, 96.0]
    assert ds.attrs["encoder"] == "nic-test" and ds.attrs["status"] == "in-progress"
    assert ds.attrs["source_fingerprint"] == source["source_fingerprint"]
    assert group.attrs["grid_shape"] == [6, 10]


def test_blocks_are_tracked_and_completion_needs_all_of_them(tmp_path, source):
    store = tmp_path / "s.zarr"
    root = open_store(store, CONFIG)
    group = create_slide(root, "slide", GRID, CONFIG, np.ones(GRID.shape, np.float32), source)
    blocks = list(iter_blocks(GRID.shape, CONFIG.block))
    write_block(group, blocks[0], np.full((8, *blocks[0].shape), 2.5, np.float16))
    write_block(group, blocks[1], None)  # a background block: marked done, no chunk
    assert done_blocks(group).sum() == 2
    with pytest.raises(NicError, match="blocks are not written"):
        mark_complete(group)
    assert list_slides(store) == [] and list_slides(store, complete_only=False) == ["slide"]
    for block in blocks[2:]:
        write_block(group, block, np.ones((8, *block.shape), np.float16))
    mark_complete(group)
    assert slide_status(root, "slide") == COMPLETE and list_slides(store) == ["slide"]
    features = xr.open_zarr(store, group="slide", consolidated=False)["features"].values
    assert (features[:, :4, :4] == 2.5).all() and (features[:, :4, 4:8] == 0).all()
    assert not (store / "slide" / "features" / "c" / "0" / "0" / "1").exists()  # no chunk for background
    assert describe_store(store)[0]["status"] == COMPLETE


def test_reopening_with_other_settings_is_refused(tmp_path):
    open_store(tmp_path / "s.zarr", CONFIG)
    open_store(tmp_path / "s.zarr", CONFIG)  # same settings: fine
    with pytest.raises(NicError, match="encoder_sha256"):
        open_store(tmp_path / "s.zarr", dataclasses.replace(CONFIG, encoder_sha256="other"))


def test_a_changed_source_file_is_not_mixed_into_its_old_group(tmp_path, source):
    root = open_store(tmp_path / "s.zarr", CONFIG)
    tissue = np.ones(GRID.shape, np.float32)
    create_slide(root, "slide", GRID, CONFIG, tissue, source)
    assert create_slide(root, "slide", GRID, CONFIG, tissue, source).path == "slide"  # resumable
    with pytest.raises(NicError, match="different slide"):
        create_slide(root, "slide", GRID, CONFIG, tissue, {**source, "source_fingerprint": "changed"})
    assert isinstance(zarr.open_group(tmp_path / "s.zarr", mode="r")["slide"], zarr.Group)
