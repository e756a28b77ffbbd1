"""The Zarr store: layout readable by xarray, one shard per block, checksums, resumable creation,
completion, failures, few files per slide, refusing mixed settings."""

import dataclasses
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from nic_pipeline.compress.catalog import describe_store, list_slides
from nic_pipeline.compress.grid import Grid, iter_blocks
from nic_pipeline.compress.store import (
    COMPLETE,
    CompressionConfig,
    block_done,
    check_slide,
    create_slide,
    mark_complete,
    open_store,
    record_failures,
    slide_block,
    slide_status,
    source_changed,
    source_fingerprint,
    write_block,
)
from nic_pipeline.errors import NicError

CONFIG = CompressionConfig(encoder="nic-test", encoder_sha256="abc", code_dim=8, mpp=0.5, patch_size=128,
                           stride=128, block=4)
GRID = Grid(width=128 * 10, height=128 * 6, slide_mpp=0.5, mpp=0.5, patch_size=128, stride=128)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "slide.tif"
    path.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    return {**source_fingerprint(path), "mpp_source": "metadata"}


def _tissue_without_block_1() -> np.ndarray:
    tissue = np.ones(GRID.shape, np.float32)
    tissue[0:4, 4:8] = 0  # block (0, 1) is background
    return tissue


def test_fingerprint_changes_with_content_and_size(tmp_path):
    path = tmp_path / "a.svs"
    path.write_bytes(b"x" * (3 << 20))
    first = source_fingerprint(path)
    assert not source_changed(first, path)
    path.write_bytes(b"x" * (3 << 20) + b"y")
    assert source_fingerprint(path)["source_fingerprint"] != first["source_fingerprint"]
    assert source_changed(first, path)


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
    assert ds.attrs["source_fingerprint"] == source["source_fingerprint"] and ds.attrs["mpp_source"] == "metadata"
    assert group.attrs["grid_shape"] == [6, 10]


def test_one_shard_per_block_and_completion_needs_every_block_with_tissue(tmp_path, source):
    store = tmp_path / "s.zarr"
    root = open_store(store, CONFIG)
    group = create_slide(root, "slide", GRID, CONFIG, _tissue_without_block_1(), source)
    blocks = list(iter_blocks(GRID.shape, CONFIG.block))
    write_block(group, blocks[0], np.full((8, *blocks[0].shape), 2.5, np.float16), {"device": "cpu", "precision": "bf16"})
    assert block_done(group, blocks[0]) and not block_done(group, blocks[2])
    with pytest.raises(NicError, match="blocks are not written"):
        mark_complete(group)
    assert list_slides(store) == [] and list_slides(store, complete_only=False) == ["slide"]
    for block in blocks[2:]:
        write_block(group, block, np.ones((8, *block.shape), np.float16))
    mark_complete(group)
    assert not (store / "slide" / "features" / "_blocks").exists()  # the records are folded into the attributes
    assert slide_status(root, "slide") == COMPLETE and list_slides(store) == ["slide"]
    features = xr.open_zarr(store, group="slide", consolidated=False)["features"].values
    assert (features[:, :4, :4] == 2.5).all() and (features[:, :4, 4:8] == 0).all()
    shards = sorted(p.relative_to(store / "slide" / "features" / "c") for p in (store / "slide").rglob("c/*/*/*"))
    assert [str(s) for s in shards] == ["0/0/0", "0/0/2", "0/1/0", "0/1/1", "0/1/2"]  # none for the background
    row = describe_store(store)[0]
    assert row["status"] == COMPLETE and row["precisions"] == ["bf16"]
    assert group.attrs["blocks"]["0.0"]["bytes"] > 0


def test_a_slide_is_a_few_files_whatever_its_size(tmp_path, source):
    """One shard per block: a 150 x 100 block grid costs the same handful of metadata files."""
    big = Grid(width=128 * 300, height=128 * 200, slide_mpp=0.5, mpp=0.5, patch_size=128, stride=128)
    config = dataclasses.replace(CONFIG, block=256)
    root = open_store(tmp_path / "s.zarr", config)
    group = create_slide(root, "big", big, config, np.ones(big.shape, np.float32), source)
    for block in iter_blocks(big.shape, 256):
        write_block(group, block, np.ones((8, *block.shape), np.float16))
    mark_complete(group)
    files = [p for p in (tmp_path / "s.zarr" / "big").rglob("*") if p.is_file()]
    assert len(files) <= 20, sorted(str(f) for f in files)


def test_a_small_slide_is_split_into_several_blocks_but_stays_a_few_files():
    """One 24,000 px slide (187 x 187 cells) is one 256-cell block: it gets 64-cell blocks, so
    that it alone keeps several workers busy; a slide already in many blocks keeps its size."""
    small = np.ones((187, 187), np.float32)
    assert slide_block(small, 256, 0.1) == 64  # 1 -> 4 -> 9 blocks
    half = small.copy()
    half[:, 100:] = 0  # tissue on the left: 64-cell blocks give 6, 32-cell ones 24 (too many files)
    assert slide_block(half, 256, 0.1) == 64
    assert slide_block(np.ones((2000, 2000), np.float32), 256, 0.1) == 256  # 64 blocks already
    assert slide_block(np.ones((8, 8), np.float32), 4, 0.1) == 4  # never below one inner chunk


def test_checksums_catch_flipped_bits_and_sizes_catch_truncation_and_loss(tmp_path, source):
    store = tmp_path / "s.zarr"
    root = open_store(store, CONFIG)
    group = create_slide(root, "slide", GRID, CONFIG, _tissue_without_block_1(), source)
    blocks = [b for b in iter_blocks(GRID.shape, CONFIG.block) if b.index != (0, 1)]
    for block in blocks:
        write_block(group, block, np.random.default_rng(block.index).normal(size=(8, *block.shape)).astype(np.float16))
    mark_complete(group)
    assert check_slide(group, verify=True) == []
    shard = store / "slide" / "features" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert [(b.index, why[:7]) for b, why in check_slide(group, verify=True)] == [((0, 0), "corrupt")]
    assert check_slide(group) == []  # the cheap check sees sizes only
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        zarr.open_group(str(store), path="slide", mode="r")["features"][:, :4, :4]
    (store / "slide" / "features" / "c" / "0" / "1" / "2").write_bytes(b"short")
    (store / "slide" / "features" / "c" / "0" / "1" / "1").unlink()
    damaged = {b.index: why for b, why in check_slide(group)}
    assert damaged[(1, 1)] == "missing" and "bytes" in damaged[(1, 2)]


def test_an_interrupted_creation_is_made_again_and_a_changed_file_refused(tmp_path, source):
    root = open_store(tmp_path / "s.zarr", CONFIG)
    tissue = np.ones(GRID.shape, np.float32)
    root.create_group("slide").create_array("features", shape=(1,), dtype="f4")  # killed half-way
    assert "status" not in root["slide"].attrs
    group = create_slide(root, "slide", GRID, CONFIG, tissue, source)
    assert group.attrs["status"] == "in-progress" and group["features"].shape == (8, 6, 10)
    assert create_slide(root, "slide", GRID, CONFIG, tissue, source).path == "slide"  # resumable
    with pytest.raises(NicError, match="different slide"):
        create_slide(root, "slide", GRID, CONFIG, tissue, {**source, "source_fingerprint": "changed"})
    rows = describe_store(tmp_path / "s.zarr")
    assert rows[0]["slide_id"] == "slide" and rows[0]["status"] == "in-progress"


def test_reopening_with_other_settings_is_refused(tmp_path):
    open_store(tmp_path / "s.zarr", CONFIG)
    open_store(tmp_path / "s.zarr", CONFIG)  # same settings: fine
    with pytest.raises(NicError, match="encoder_sha256"):
        open_store(tmp_path / "s.zarr", dataclasses.replace(CONFIG, encoder_sha256="other"))
    with pytest.raises(NicError, match="pass --encoder nic-test to finish it") as refused:  # e.g. a new default
        open_store(tmp_path / "s.zarr", dataclasses.replace(CONFIG, encoder="nic-other", encoder_sha256="other"))
    assert "encoder: store has 'nic-test', this run 'nic-other'" in str(refused.value)


def test_failures_are_kept_and_listed_and_a_slide_opens_in_xarray(tmp_path, source):
    store = tmp_path / "s.zarr"
    root = open_store(store, CONFIG)
    for name in ("a", "b"):
        group = create_slide(root, name, GRID, CONFIG, np.zeros(GRID.shape, np.float32), source)
        mark_complete(group)
    record_failures(root, {"bad": "truncated file", "b": "an earlier failure"}, succeeded=[])
    record_failures(root, {}, succeeded=["b"])  # b succeeded in a later run
    assert root.attrs["failed"] == {"bad": "truncated file"}
    rows = {r["slide_id"]: r for r in describe_store(store)}
    assert rows["bad"]["status"] == "failed" and rows["bad"]["error"] == "truncated file"
    assert rows["a"]["status"] == COMPLETE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the README's snippet, without a consolidated-metadata warning
        ds = xr.open_zarr(store, group="a", consolidated=False)
    assert ds["features"].shape == (8, 6, 10)


def test_a_run_drops_the_root_copy_of_every_slide_that_older_versions_left(tmp_path, source):
    store = tmp_path / "s.zarr"
    create_slide(open_store(store, CONFIG), "a", GRID, CONFIG, np.ones(GRID.shape, np.float32), source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store), zarr_format=3)  # what every run of an older version did
    assert b"consolidated_metadata" in (store / "zarr.json").read_bytes()
    open_store(store, CONFIG)
    assert b"consolidated_metadata" not in (store / "zarr.json").read_bytes()
    assert open_store(store, CONFIG).attrs["compression"] == CONFIG.as_attrs()
