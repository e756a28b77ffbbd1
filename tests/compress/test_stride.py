"""A denser grid (`nic compress --stride 64`): overlapping 128 px patches, four times the cells."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from distributed import Client

from nic_pipeline.cli import main
from nic_pipeline.compress.codes import encode_patches
from nic_pipeline.compress.encode import EncoderSettings, NicWorker
from nic_pipeline.compress.graph import compress, compression_config
from nic_pipeline.compress.grid import Grid, cell_coverage
from nic_pipeline.compress.interop import export_h5
from nic_pipeline.compress.jobs import plan_jobs
from nic_pipeline.errors import NicError
from nic_pipeline.io import open_slide
from nic_pipeline.synth import write_synthetic_slide

SETTINGS = EncoderSettings(precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, external_cluster):
    """One small synthetic slide compressed at stride 128 and at stride 64."""
    folder = tmp_path_factory.mktemp("stride")
    slide = folder / "dense.tif"
    write_synthetic_slide(slide, 1536, 1536, mpp=0.5, seed=5)
    out = {}
    with Client(scheduler_file=external_cluster) as client:
        for stride in (128, 64):
            out[stride] = folder / f"s{stride}.zarr"
            report = compress(plan_jobs([slide]), out[stride], client, SETTINGS, block=16, progress=False,
                              stride=None if stride == 128 else stride)
            assert [s.status for s in report.slides] == ["complete"]
    return slide, out


def _open(store):
    return xr.open_zarr(store, group="dense", consolidated=False)


def test_stride_64_has_four_times_the_cells_and_the_same_patches(stores):
    _, store = stores
    coarse, dense = _open(store[128]), _open(store[64])
    assert dense.attrs["stride"] == 64 and dense.attrs["patch_size"] == 128 and coarse.attrs["stride"] == 128
    (ny, nx), (my, mx) = coarse["tissue"].shape, dense["tissue"].shape
    assert (my, mx) == (2 * ny - 1, 2 * nx - 1)  # 1536 px: 12 patches of 128, 23 at a step of 64
    # cell (2i, 2j) at stride 64 is the patch of cell (i, j) at stride 128: same tissue, same code
    np.testing.assert_allclose(dense["tissue"].values[::2, ::2], coarse["tissue"].values, atol=1e-6)
    np.testing.assert_allclose(dense["features"].values[:, ::2, ::2], coarse["features"].values, atol=2e-3)
    cells = [int((ds["tissue"].values >= ds.attrs["min_tissue"]).sum()) for ds in (coarse, dense)]
    assert 3.2 < cells[1] / cells[0] < 4.5
    # cell centres every 32 µm, the first at the centre of the first 64 µm patch
    assert dense["x"].values[:3].tolist() == [32.0, 64.0, 96.0]


def test_a_code_between_the_coarse_cells_is_the_encoder_on_that_exact_region(stores):
    slide, store = stores
    dense = _open(store[64])
    features, tissue = dense["features"].values.astype(np.float32), dense["tissue"].values
    odd = np.zeros(tissue.shape, bool)
    odd[1::2, 1::2] = True  # patches that straddle four stride-128 cells
    rows, cols = np.nonzero(odd & (tissue >= 0.5))
    assert len(rows) > 3
    picks = [0, len(rows) // 2, len(rows) - 1]
    with open_slide(slide) as handle:
        patches = np.stack([handle.read_region((int(cols[k]) * 64, int(rows[k]) * 64), (128, 128)) for k in picks])
    direct = encode_patches(NicWorker().encoder(SETTINGS).module, patches, "fp32")
    stored = features[:, rows[picks], cols[picks]].T
    np.testing.assert_allclose(stored, direct.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_export_and_inspect_show_the_overlap(stores, tmp_path):
    _, store = stores
    [path] = export_h5(store[64], tmp_path)
    with h5py.File(path, "r") as handle:
        coords = handle["coords"]
        assert coords.attrs["overlap"] == 64 and coords.attrs["patch_size_level0"] == 128
        steps = np.unique(np.diff(np.unique(coords[:, 0])))
        assert steps.min() == 64  # neighbouring patches 64 px apart
    result = CliRunner().invoke(main, ["inspect", str(store[64]), "--json"])
    assert result.exit_code == 0 and '"stride": 64' in result.output


def test_patch_window_coverage_and_bad_strides():
    mask = np.zeros((8, 8), bool)
    mask[0:3, 0:3] = True  # 96 x 96 µm in the corner (mask px of 32 µm)
    grid = Grid(256, 256, 1.0, 1.0, patch_size=128, stride=64)  # patches of 128 µm every 64 µm
    cover = cell_coverage(mask, 32.0, grid.cell_um, grid.shape, grid.patch_um)
    assert grid.shape == (3, 3)
    assert cover[0, 0] == pytest.approx(96 * 96 / 128**2)
    assert cover[0, 1] == pytest.approx(96 * 32 / 128**2)  # window [64, 192) µm across
    assert cover[1, 1] == pytest.approx(32 * 32 / 128**2) and cover[2, 2] == 0
    # without a window, a cell is its own step (abutting patches)
    assert cell_coverage(mask, 32.0, 64.0, (3, 3))[1, 1] == pytest.approx(0.25)
    with pytest.raises(NicError, match="--stride"):
        compression_config(SETTINGS, 256, 0.1, 8.0, stride=256)
