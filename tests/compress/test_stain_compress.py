"""`nic compress --stain-norm` end to end on tiny synthetic slides: the codes are those of the
normalised patches, the settings are recorded, other settings are refused, a cohort target is kept."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr
from PIL import Image

from nic_pipeline.compress.codes import encode_patches
from nic_pipeline.compress.encode import EncoderSettings, NicWorker, read_cells
from nic_pipeline.compress.graph import compress
from nic_pipeline.compress.grid import Grid, iter_blocks
from nic_pipeline.compress.jobs import plan_jobs
from nic_pipeline.compress.stain import Stain, fit_stain, normalise
from nic_pipeline.compress.stain_fit import with_stain_target
from nic_pipeline.compress.store import CompressionConfig
from nic_pipeline.errors import NicError
from nic_pipeline.io import open_slide
from nic_pipeline.runtime.cluster import connect
from nic_pipeline.synth import write_synthetic_slide

SETTINGS = EncoderSettings(precision="bf16", device="cpu")
BLOCK = 8


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Two 2048 px synthetic slides of other stains (jitter 0.3), and a reference image of a third."""
    folder = tmp_path_factory.mktemp("stain")
    for name, seed in (("a", 2), ("b", 3)):
        write_synthetic_slide(folder / f"{name}.tif", 2048, 2048, 0.5, seed=seed, stain_jitter=0.3)
    write_synthetic_slide(folder / "ref.tif", 2048, 2048, 0.5, seed=6)
    with open_slide(folder / "ref.tif") as slide:
        Image.fromarray(slide.read_region((0, 0), (1024, 1024), 0)[..., :3]).save(folder / "ref.png")
    return folder


@pytest.fixture(scope="module")
def client():
    with connect(workers=1, dashboard=False) as active:
        yield active


@pytest.mark.slow
def test_codes_are_those_of_the_normalised_patches_and_settings_are_recorded(tmp_path, slides, client):
    store = tmp_path / "macenko.zarr"
    jobs = plan_jobs([slides / "a.tif"])
    report = compress(jobs, store, client, SETTINGS, block=BLOCK, progress=False, stain_norm="macenko",
                      stain_target=str(slides / "ref.png"))
    assert [s.status for s in report.slides] == ["complete"]
    root = zarr.open_group(str(store), mode="r")
    settings, attrs = root.attrs["compression"], root["a"].attrs
    with Image.open(slides / "ref.png") as image:
        target = fit_stain("macenko", np.asarray(image))
    assert settings["stain_norm"] == attrs["stain_norm"] == "macenko"
    assert settings["stain_reference"] == str((slides / "ref.png").resolve())
    assert tuple(settings["stain_target"]) == target.values == tuple(attrs["stain_target"])
    source = Stain("macenko", tuple(attrs["stain_source"]))
    assert source != target

    # one block encoded directly from its normalised patches gives the stored codes
    features = root["a"]["features"][...].astype(np.float32)
    tissue = root["a"]["tissue"][...]
    encoder = NicWorker().encoder(SETTINGS)
    with open_slide(slides / "a.tif") as slide:
        grid = Grid(*slide.dimensions, slide.require_mpp(), 0.5, 128, 128)
        block = max(iter_blocks(grid.shape, BLOCK), key=lambda b: (tissue[b.slices] >= 0.1).sum())
        rows, cols = np.nonzero(tissue[block.slices] >= 0.1)
        raw = read_cells(slide, grid, block, rows, cols)
    normalised = normalise(raw, source, target)
    assert np.abs(normalised.astype(int) - raw).mean() > 2  # the stain did change
    direct = encode_patches(encoder.module, normalised, "bf16")
    stored = features[:, block.y0 + rows, block.x0 + cols].T
    np.testing.assert_allclose(stored, direct.astype(np.float32), rtol=1e-3, atol=1e-3)
    assert np.abs(stored - encode_patches(encoder.module, raw, "bf16")).max() > 0.05

    # a rerun with other stain settings, or none, is refused; the same settings skip the slide
    for other in ({"stain_norm": "reinhard", "stain_target": str(slides / "ref.png")}, {}):
        with pytest.raises(NicError, match="stain_norm"):
            compress(jobs, store, client, SETTINGS, block=BLOCK, progress=False, **other)
    again = compress(jobs, store, client, SETTINGS, block=BLOCK, progress=False, stain_norm="macenko",
                     stain_target=str(slides / "ref.png"))
    assert again.slides[0].status == "skipped"


@pytest.mark.slow
def test_a_cohort_target_is_the_median_and_is_kept_when_slides_are_added(tmp_path, slides, client):
    store = tmp_path / "reinhard.zarr"
    first = compress(plan_jobs([slides / "a.tif"]), store, client, SETTINGS, block=BLOCK, progress=False,
                     stain_norm="reinhard", stain_target="cohort")
    assert first.slides[0].status == "complete"
    root = zarr.open_group(str(store), mode="r")
    target = root.attrs["compression"]["stain_target"]
    assert target == root["a"].attrs["stain_source"]  # a cohort of one slide: its own stain
    both = compress(plan_jobs([slides / "a.tif", slides / "b.tif"]), store, client, SETTINGS, block=BLOCK,
                    progress=False, stain_norm="reinhard", stain_target="cohort")
    assert sorted(s.status for s in both.slides) == ["complete", "skipped"]
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["compression"]["stain_target"] == target == root["b"].attrs["stain_target"]
    assert root["b"].attrs["stain_source"] != target


def test_bad_stain_options_are_named():
    config = CompressionConfig(encoder="nic", encoder_sha256="x", code_dim=8, mpp=0.5, patch_size=128, stride=128)
    with pytest.raises(NicError, match="needs --stain-target"):
        with_stain_target(config, "macenko", None, [], None, "s.zarr")
    with pytest.raises(NicError, match="needs --stain-norm"):
        with_stain_target(config, "none", "cohort", [], None, "s.zarr")
    with pytest.raises(NicError, match="no such file"):
        with_stain_target(config, "reinhard", "/nowhere/ref.svs", [], None, "s.zarr")
    assert with_stain_target(config, "none", None, [], None, "s.zarr").as_attrs() == config.as_attrs()
    assert "stain_norm" not in config.as_attrs()  # stores made without it read as before


@pytest.mark.slow
def test_cli_takes_the_stain_options(tmp_path, slides):
    store = tmp_path / "cli.zarr"
    run = subprocess.run([sys.executable, "-m", "nic_pipeline", "compress", str(slides / "b.tif"), "--out", str(store),
                          "--workers", "1", "--block", str(BLOCK), "--precision", "bf16", "--stain-norm", "macenko",
                          "--stain-target", str(slides / "ref.tif")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    attrs = zarr.open_group(str(store), mode="r")["b"].attrs
    assert attrs["stain_norm"] == "macenko" and len(attrs["stain_source"]) == 8
    assert attrs["stain_reference"] == str((slides / "ref.tif").resolve())


def test_a_reference_that_cannot_be_fitted_says_why(tmp_path):
    config = CompressionConfig(encoder="nic", encoder_sha256="x", code_dim=8, mpp=0.5, patch_size=128, stride=128)
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(tmp_path / "glass.png")
    with pytest.raises(NicError, match="too little tissue to fit a reinhard stain"):
        with_stain_target(config, "reinhard", str(tmp_path / "glass.png"), [], None, "s.zarr")
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(NicError, match="--stain-target .*empty.svs: .*empty"):
        with_stain_target(config, "macenko", str(tmp_path / "empty.svs"), [], None, "s.zarr")
