"""`nic preview`: the tissue mask and patch grid nic compress would use, over the thumbnail."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from nic_pipeline.cli import main
from nic_pipeline.compress.encode import EncoderSettings
from nic_pipeline.compress.graph import compression_config, detect_tissue
from nic_pipeline.compress.jobs import plan_jobs
from nic_pipeline.synth import write_synthetic_slide
from nic_pipeline.viz.preview import slide_plan


@pytest.mark.slow
def test_preview_shows_the_cells_compress_would_encode(tmp_path):
    slides = tmp_path / "slides"
    write_synthetic_slide(slides / "one.tif", 2048, 1536, mpp=0.5, seed=2)
    result = CliRunner().invoke(main, ["preview", str(slides), "--out", str(tmp_path / "pv"), "--stride", "64"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "pv" / "one.png").size == (2400, 1200)  # the figure of nic view and nic heatmap
    shown = int(result.output.split(": ")[1].split(" of ")[0])
    # nic compress's own first task on the same slide, with the same settings
    [job] = plan_jobs([slides])
    config = compression_config(EncoderSettings(), block=16, min_tissue=0.1, mask_mpp=8.0, stride=64)
    detected = detect_tissue(str(tmp_path / "s.zarr"), job, config)
    assert shown == detected["tissue_cells"] > 0
    stored = zarr.open_group(str(tmp_path / "s.zarr"), path="one", mode="r")["tissue"][:]
    grid, tissue, *_ = slide_plan(job, stride=64)
    assert grid == detected["grid"] and f"{grid.shape[0]} x {grid.shape[1]} grid" in result.output
    np.testing.assert_allclose(tissue, stored, atol=1e-6)


@pytest.mark.slow
def test_a_bad_file_is_reported_and_the_rest_drawn(tmp_path):
    write_synthetic_slide(tmp_path / "good.tif", 1024, 1024, mpp=0.5, seed=1)
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    result = CliRunner().invoke(main, ["preview", str(tmp_path), "--out", str(tmp_path / "pv")])
    assert result.exit_code == 1 and "FAILED" in result.output and (tmp_path / "pv" / "good.png").exists()
