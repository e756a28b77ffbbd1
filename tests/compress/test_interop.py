"""CLAM/TRIDENT HDF5 interop: export round-trips through a CLAM-style reader and back onto a grid."""

import h5py
import numpy as np
import pytest

from nic_pipeline.compress.grid import Grid, iter_blocks
from nic_pipeline.compress.interop import export_h5, import_h5
from nic_pipeline.compress.store import (
    CompressionConfig,
    consolidate,
    create_slide,
    mark_complete,
    open_store,
    write_block,
)
from nic_pipeline.classify.source import SlideSource

CONFIG = CompressionConfig(encoder="nic-test", encoder_sha256="abc", code_dim=8, mpp=0.5, patch_size=128,
                           stride=128, block=4)
GRID = Grid(width=128 * 2 * 9 + 100, height=128 * 2 * 5 + 50, slide_mpp=0.25, mpp=0.5, patch_size=128, stride=128)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.zarr"
    root = open_store(path, CONFIG)
    rng = np.random.default_rng(0)
    tissue = (rng.random(GRID.shape) > 0.5).astype(np.float32)
    group = create_slide(root, "slide", GRID, CONFIG, tissue,
                         {"source_path": "x", "source_fingerprint": "y", "mpp_source": "metadata"})
    codes = rng.normal(size=(8, *GRID.shape)).astype(np.float16) * (tissue > 0)
    for block in iter_blocks(GRID.shape, 4):
        write_block(group, block, codes[(slice(None), *block.slices)])
    mark_complete(group)
    consolidate(path)
    return path, codes, tissue


def clam_style_read(path):
    """What CLAM's feature loaders take from an h5: the two arrays and the patching attributes."""
    with h5py.File(path, "r") as handle:
        return (handle["features"][:], handle["coords"][:], handle["coords"].attrs["patch_size"],
                handle["coords"].attrs["patch_level"], dict(handle["coords"].attrs))


def test_export_reads_as_clam_and_trident_bags_and_imports_back(store, tmp_path):
    path, codes, tissue = store
    [h5] = export_h5(path, tmp_path / "h5")
    features, coords, patch_size, patch_level, attrs = clam_style_read(h5)
    rows, cols = np.nonzero(tissue >= 0.1)
    assert features.shape == (len(rows), 8) and coords.shape == (len(rows), 2)
    assert patch_size == 128 and patch_level == 0 and attrs["patch_size_level0"] == 256
    assert attrs["level0_magnification"] == 40 and attrs["target_magnification"] == 20 and attrs["overlap"] == 0
    np.testing.assert_array_equal(coords, np.stack([cols * 256, rows * 256], axis=1))  # level-0 (x, y)
    np.testing.assert_array_equal(features, codes[:, rows, cols].T.astype(np.float32))

    back = tmp_path / "back.zarr"
    assert import_h5([h5], back, encoder="nic-test") == ["slide"]
    source = SlideSource(back)
    imported = source.features("slide")
    assert imported.shape[0] == 8 and imported.shape[1] >= rows.max() + 1 and imported.shape[2] >= cols.max() + 1
    np.testing.assert_array_equal(imported[:, rows, cols], codes[:, rows, cols])
    assert source.tissue("slide")[rows, cols].min() == 1.0


def test_a_trident_bag_with_overlap_lands_on_its_grid(tmp_path):
    h5 = tmp_path / "t.h5"
    with h5py.File(h5, "w") as handle:
        handle.create_dataset("features", data=np.arange(3 * 4, dtype=np.float32).reshape(1, 3, 4))
        coords = handle.create_dataset("coords", data=np.array([[0, 0], [512, 0], [256, 768]]))
        coords.attrs.update({"patch_size": 256, "patch_size_level0": 512, "overlap": 128,
                             "level0_magnification": 40.0, "target_magnification": 20.0, "name": "t"})
    import_h5([h5], tmp_path / "t.zarr", encoder="uni")
    source = SlideSource(tmp_path / "t.zarr")
    grid = source.features("t")
    assert source.meta("t")["attrs"]["stride"] == 128 and source.meta("t")["attrs"]["slide_mpp"] == 0.25
    np.testing.assert_array_equal(grid[:, 0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(grid[:, 0, 2], [4, 5, 6, 7])   # 512 px at a 256 px step
    np.testing.assert_array_equal(grid[:, 3, 1], [8, 9, 10, 11])
