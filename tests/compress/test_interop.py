"""CLAM/TRIDENT HDF5 interop: CLAM's export layout, and bags placed back on their own lattice."""

import csv

import h5py
import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from nic_pipeline.classify.source import SlideSource
from nic_pipeline.cli import main
from nic_pipeline.compress.grid import Grid, iter_blocks
from nic_pipeline.compress.interop import export_h5, import_h5, lattice
from nic_pipeline.compress.store import (
    CompressionConfig,
    create_slide,
    mark_complete,
    open_store,
    record_failures,
    write_block,
)
from nic_pipeline.errors import NicError

CONFIG = CompressionConfig(encoder="nic-test", encoder_sha256="abc", code_dim=8, mpp=0.5, patch_size=128,
                           stride=128, block=4)
GRID = Grid(width=128 * 2 * 9 + 100, height=128 * 2 * 5 + 50, slide_mpp=0.25, mpp=0.5, patch_size=128, stride=128)
SOURCE = {"source_path": "x", "source_fingerprint": "y", "mpp_source": "metadata"}


@pytest.fixture
def store(tmp_path):
    """A store with one complete slide, one left in progress and one failed."""
    path = tmp_path / "s.zarr"
    root = open_store(path, CONFIG)
    rng = np.random.default_rng(0)
    tissue = (rng.random(GRID.shape) > 0.5).astype(np.float32)
    group = create_slide(root, "slide", GRID, CONFIG, tissue, SOURCE)
    codes = rng.normal(size=(8, *GRID.shape)).astype(np.float16) * (tissue > 0)
    for block in iter_blocks(GRID.shape, 4):
        write_block(group, block, codes[(slice(None), *block.slices)])
    mark_complete(group)
    create_slide(root, "halfway", GRID, CONFIG, tissue, {**SOURCE, "source_fingerprint": "z"})
    record_failures(root, {"broken": "truncated file"}, [])
    return path, codes, tissue


def write_bag(path, coords, features=None, coords_attrs=None, feature_attrs=None):
    """An h5 bag as CLAM (no attributes) or TRIDENT (attributes) writes one."""
    coords = np.asarray(coords, dtype=np.int64)
    features = np.arange(len(coords) * 4, dtype=np.float32).reshape(-1, 4) if features is None else features
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features).attrs.update(feature_attrs or {})
        handle.create_dataset("coords", data=coords).attrs.update(coords_attrs or {})
    return path


def test_export_writes_clams_layout_and_lists_what_it_leaves_out(store, tmp_path):
    path, codes, tissue = store
    out = tmp_path / "feats"
    [h5] = export_h5(path, out)
    assert h5 == out / "h5_files" / "slide.h5"
    rows, cols = np.nonzero(tissue >= 0.1)
    with h5py.File(h5, "r") as handle:  # what CLAM's Generic_MIL_Dataset reads with load_from_h5(True)
        features, coords, attrs = handle["features"][:], handle["coords"][:], dict(handle["coords"].attrs)
    assert features.shape == (len(rows), 8) and features.dtype == np.float32 and coords.shape == (len(rows), 2)
    np.testing.assert_array_equal(coords, np.stack([cols * 256, rows * 256], axis=1))  # level-0 (x, y)
    np.testing.assert_array_equal(features, codes[:, rows, cols].T.astype(np.float32))
    assert attrs["patch_size"] == 128 and attrs["patch_level"] == 0 and attrs["patch_size_level0"] == 256
    assert attrs["level0_magnification"] == 40 and attrs["target_magnification"] == 20 and attrs["overlap"] == 0
    ny, nx = GRID.shape
    assert (attrs["level0_width"], attrs["level0_height"]) == (nx * 256, ny * 256)
    pt = torch.load(out / "pt_files" / "slide.pt")  # what it reads by default (torch.load, weights_only)
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32
    np.testing.assert_array_equal(pt.numpy(), features)
    with open(out / "left_out.csv") as handle:
        left = {row["slide_id"]: row for row in csv.DictReader(handle)}
    assert set(left) == {"halfway", "broken"}
    assert left["broken"]["status"] == "failed" and left["broken"]["reason"] == "truncated file"
    assert left["halfway"]["status"] == "in-progress" and "rerun nic compress" in left["halfway"]["reason"]
    assert not (out / "h5_files" / "halfway.h5").exists() and not (out / "pt_files" / "broken.pt").exists()


def test_nic_export_prints_the_slides_left_out(store, tmp_path):
    result = CliRunner().invoke(main, ["export", str(store[0]), "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert "LEFT OUT broken: failed: truncated file" in result.output
    assert "wrote 1 slides" in result.output and "2 left out, listed in" in result.output


def test_our_export_round_trips_with_the_whole_grid(store, tmp_path):
    path, codes, tissue = store
    export_h5(path, tmp_path / "feats")
    back = tmp_path / "back.zarr"
    report = import_h5([tmp_path / "feats"], back)  # the export's folder; the encoder is read from the files
    assert report.imported == ["slide"] and not report.refused
    source = SlideSource(back)
    assert source.features("slide").shape == (8, *GRID.shape)  # not shrunk to the last patch
    rows, cols = np.nonzero(tissue >= 0.1)
    np.testing.assert_array_equal(source.features("slide")[:, rows, cols], codes[:, rows, cols])
    assert source.tissue("slide")[rows, cols].min() == 1.0 and source.tissue("slide").sum() == len(rows)
    attrs = source.meta("slide")["attrs"]
    assert attrs["encoder"] == "nic-test" and attrs["encoder_sha256"] == "abc" and attrs["lattice_origin_px"] == [0, 0]
    export_h5(back, tmp_path / "again")
    with h5py.File(tmp_path / "feats/h5_files/slide.h5") as first, h5py.File(tmp_path / "again/h5_files/slide.h5") as second:
        np.testing.assert_array_equal(first["coords"][:], second["coords"][:])
        np.testing.assert_array_equal(first["features"][:], second["features"][:])


def test_off_lattice_patches_keep_their_cells_and_origin(tmp_path):
    """Issue 21: ten patches at x = 128 (mod 256) became 6 cells."""
    coords = [(128 + 256 * i, 384) for i in range(10)]
    h5 = write_bag(tmp_path / "off.h5", coords, coords_attrs={"patch_size": 256, "level0_mpp": 0.5,
                                                             "level0_width": 3000, "level0_height": 1000})
    report = import_h5([h5], tmp_path / "off.zarr", encoder="uni")
    assert report.imported == ["off"], report.refused
    source = SlideSource(tmp_path / "off.zarr")
    attrs = source.meta("off")["attrs"]
    assert attrs["lattice_origin_px"] == [128, 128] and attrs["slide_size_px"] == [3000, 1000]
    assert source.tissue("off").sum() == 10 and source.tissue("off").shape == ((1000 - 128) // 256, (3000 - 128) // 256)
    np.testing.assert_array_equal(source.features("off")[:, 1, :10].T, np.arange(40).reshape(10, 4))
    ds = xr.open_zarr(tmp_path / "off.zarr", group="off", consolidated=False)
    assert float(ds.x[0]) == pytest.approx((128 + 128) * 0.5)  # cell centre in µm, from the origin


def test_patches_on_two_lattices_are_refused_or_snapped_never_merged(tmp_path):
    attrs = {"patch_size": 256, "level0_mpp": 0.25}
    two_pieces = [(0, 0), (256, 0), (512, 0), (1300, 700), (1556, 700)]  # a second piece starts at (1300, 700)
    h5 = write_bag(tmp_path / "two.h5", two_pieces, coords_attrs=attrs)
    report = import_h5([h5], tmp_path / "two.zarr", encoder="uni")
    assert not report.imported
    assert "2 of 5 patches lie off the lattice" in report.refused[str(h5)] and "--snap" in report.refused[str(h5)]
    snapped = import_h5([h5], tmp_path / "two.zarr", encoder="uni", snap=True)
    assert snapped.imported == ["two"]
    meta = SlideSource(tmp_path / "two.zarr").meta("two")["attrs"]
    assert meta["snapped_px"] == 68  # (1300, 700) moved to the cell at (1280, 768)
    crowded = write_bag(tmp_path / "crowd.h5", [(0, 0), (120, 0), (256, 0)], coords_attrs=attrs)
    refused = import_h5([crowded], tmp_path / "crowd.zarr", encoder="uni", snap=True).refused[str(crowded)]
    assert "fall on a cell that another patch holds" in refused


def test_lattice_tolerates_rounded_coords_of_a_non_integer_step():
    step = 253.2
    coords = np.round(np.stack([np.arange(20) * step + 37, np.full(20, 37.0)], axis=1))
    origin, cells, moved = lattice(coords, step)
    assert origin.tolist() == [37, 37] and cells[:, 0].tolist() == list(range(20)) and moved <= 1.0
    with pytest.raises(NicError, match="off the lattice"):
        lattice(np.array([[0, 0], [256, 0], [384, 0]]), 256.0)


def test_clam_feature_files_take_their_patching_from_patches(tmp_path):
    """CLAM's feature h5 has no attributes; its patches/<slide>.h5 has them, and a lattice that
    starts at the tissue's bounding box (here 1234, 777) and a level_dim of the whole slide."""
    start = np.array([1234, 777])
    coords = start + np.array([(0, 0), (256, 0), (512, 256), (0, 512)])
    write_bag(tmp_path / "clam/feats/h5_files/s1.h5", coords)
    write_bag(tmp_path / "clam/feats/patches/s1.h5", coords, features=np.zeros((4, 1)),
              coords_attrs={"patch_size": 256, "patch_level": 0, "downsample": [1.0, 1.0],
                            "level_dim": [6000, 4000], "name": "s1"})
    report = import_h5([tmp_path / "clam/feats"], tmp_path / "c.zarr", encoder="resnet50-trunc", mpp=0.25)
    assert report.imported == ["s1"], report.refused
    source = SlideSource(tmp_path / "c.zarr")
    attrs = source.meta("s1")["attrs"]
    origin = (start % 256).tolist()
    assert attrs["lattice_origin_px"] == origin and attrs["slide_size_px"] == [6000, 4000]
    assert source.tissue("s1").shape == ((4000 - origin[1]) // 256, (6000 - origin[0]) // 256)  # the whole slide
    rows, cols = ((coords - origin) // 256)[:, 1], ((coords - origin) // 256)[:, 0]
    np.testing.assert_array_equal(source.features("s1")[:, rows, cols].T, np.arange(16).reshape(4, 4))
    # without patches/: the patch size must be given
    alone = write_bag(tmp_path / "alone/s2.h5", coords)
    refused = import_h5([alone], tmp_path / "d.zarr", encoder="r", mpp=0.25).refused[str(alone)]
    assert refused == "no patch size in the file and no patches/ file lies beside it; pass --patch-size (level-0 px) or --patches DIR"
    assert import_h5([alone], tmp_path / "d.zarr", encoder="r", mpp=0.25, patch_size=256).imported == ["s2"]


def test_import_h5_on_a_folder_reads_the_encoder_from_the_files(store, tmp_path):
    """Issue 20: a folder gave IsADirectoryError, and --encoder was demanded though recorded."""
    export_h5(store[0], tmp_path / "feats")
    result = CliRunner().invoke(main, ["import-h5", str(tmp_path / "feats/h5_files"), "--out", str(tmp_path / "b.zarr")])
    assert result.exit_code == 0, result.output
    assert "imported 1 slides" in result.output


def test_import_h5_refusals_are_one_line_each(tmp_path):
    bare = write_bag(tmp_path / "in/bare.h5", [(0, 0)], coords_attrs={"patch_size_level0": 256, "level0_mpp": 0.5})
    (tmp_path / "in/junk.h5").write_text("not hdf5")
    result = CliRunner().invoke(main, ["import-h5", str(tmp_path / "in"), "--out", str(tmp_path / "o.zarr")])
    assert result.exit_code == 1
    assert f"REFUSED {bare}: the file does not record its encoder; pass --encoder NAME" in result.output
    assert f"REFUSED {tmp_path / 'in/junk.h5'}: not readable as HDF5" in result.output
    assert "Traceback" not in result.output and "imported 0 slides" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["import-h5", str(empty), "--out", str(tmp_path / "o.zarr")])
    assert result.exit_code == 2 and "no .h5 feature files in this folder" in result.output
    result = CliRunner().invoke(main, ["import-h5", str(bare), "--out", str(tmp_path / "o.zarr"), "--mpp", "nan"])
    assert result.exit_code == 2 and "nan is not a positive number" in result.output


def test_the_slide_given_sets_the_grid_and_mpp(tmp_path):
    from nic_pipeline.synth import write_synthetic_slide

    slide = tmp_path / "slides/s3.tif"
    slide.parent.mkdir()
    write_synthetic_slide(slide, 1024, 768, mpp=0.5, seed=1)
    h5 = write_bag(tmp_path / "s3.h5", [(0, 0), (256, 256)], coords_attrs={"patch_size": 256})
    report = import_h5([h5], tmp_path / "s.zarr", encoder="e", slides=[slide.parent])
    assert report.imported == ["s3"], report.refused
    attrs = SlideSource(tmp_path / "s.zarr").meta("s3")["attrs"]
    assert attrs["slide_size_px"] == [1024, 768] and attrs["slide_size_source"] == "slide"
    assert attrs["slide_mpp"] == 0.5 and attrs["mpp_source"] == "slide" and attrs["grid_shape"] == [3, 4]
