"""`nic heatmap` on a trained run: slide files found from the store, every number labelled
in-sample or out-of-fold, the colour bar in cohort percentiles, a finer map from a stride-64
store, and the QuPath GeoJSON and pyramidal TIFF exports read back by the readers that follow
their specifications (geojson and shapely for RFC 7946, tifffile for the TIFF)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import geojson
import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image
from shapely.geometry import shape

from nic_pipeline.classify.explain import _check_fine_store, explain_cohort
from nic_pipeline.cli import main
from nic_pipeline.errors import NicError
from nic_pipeline.viz.export import overlay_downsample, write_overlay_tiff
from nic_pipeline.viz.heatmap import HeatScale
from tests.viz.conftest import GRID, dense_copy


@pytest.fixture(scope="module")
def heatmaps(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("heat")
    result = CliRunner().invoke(main, ["heatmap", str(run["store"]), "--model", str(run["run"]), "--out", str(out),
                                       "--masks", str(run["masks"]), "--geojson", "--overlay"])
    assert result.exit_code == 0, result.output
    return out, result.output, pd.read_csv(out / "heatmaps.csv", dtype={"slide_id": str})


def test_every_printed_and_drawn_number_says_in_sample(heatmaps, run):
    out, printed, table = heatmaps
    assert "wrote 6 heatmaps" in printed and "6 in-sample" in printed
    auc_lines = [line for line in printed.splitlines() if "AUC" in line]
    assert auc_lines and all(line.startswith("in-sample heatmap AUC vs lesion: median") for line in auc_lines)
    assert (table["evaluation"] == "in-sample").all() and table["lesion_auc"].notna().sum() == 3
    summary = json.loads((out / "heatmaps.json").read_text())
    assert set(summary["evaluation"]) == {"in-sample"} and set(summary["lesion_auc"]) == {"in-sample"}
    assert summary["lesion_auc"]["in-sample"]["median"] > 0.9  # the mean model finds the lesion


@pytest.mark.slow  # two heatmap runs
def test_out_of_fold_and_held_out_slides_are_told_apart(run, tmp_path):
    frame = explain_cohort(run["store"], run["run"], tmp_path / "oof", masks_dir=run["masks"], out_of_fold=True)
    assert (frame["evaluation"] == "out-of-fold").all()
    (run["run"] / "oof_predictions.csv").rename(tmp_path / "oof.csv")  # a run that never saw these slides...
    try:
        labels = pd.read_csv(run["labels"]).iloc[:2]  # ...except two, named by a labels table
        frame = explain_cohort(run["store"], run["run"], tmp_path / "held", labels=labels)
    finally:
        (tmp_path / "oof.csv").rename(run["run"] / "oof_predictions.csv")
    assert frame["evaluation"].tolist() == ["in-sample"] * 2 + ["held-out"] * 4


def test_thumbnails_come_from_the_paths_the_store_recorded(heatmaps, run):
    out, _, _ = heatmaps
    with_file = np.asarray(Image.open(out / "slide-000.png").convert("RGB"), np.int16)
    without = np.asarray(Image.open(out / "slide-002.png").convert("RGB"), np.int16)
    assert with_file.shape == without.shape == (1200, 2400, 3)  # the figure of nic view
    left = slice(150, 1050), slice(150, 1000)  # inside the left panel
    pinkish = lambda img: np.mean((img[left][..., 0] - img[left][..., 1]) > 25)  # noqa: E731 - H&E, not grey
    assert pinkish(with_file) > 0.2 > 0.02 > pinkish(without)


def test_colour_bar_reads_in_cohort_percentiles_and_raw_values_stay(heatmaps):
    out, _, table = heatmaps
    summary = json.loads((out / "heatmaps.json").read_text())
    scale = HeatScale(**{k: (tuple(v) if k == "reference" else v) for k, v in summary["scale"].items()})
    raw = np.concatenate([np.load(out / "relevance" / f"{sid}.npy").ravel() for sid in table["slide_id"]])
    raw = raw[np.isfinite(raw)]
    expected = np.array([np.mean(raw < v) + np.mean(raw == v) / 2 for v in raw[::7]]) * 100
    assert np.abs(scale.percentile(raw[::7]) - expected).max() < 1.0  # the cohort's own percentiles
    assert summary["percentiles"]["p99"] == pytest.approx(np.percentile(raw, 99), rel=1e-6)
    np.testing.assert_allclose(table["relevance_max"],
                               [np.nanmax(np.load(out / "relevance" / f"{s}.npy")) for s in table["slide_id"]], rtol=1e-6)
    assert (table.loc[table["lesion_auc"].notna(), "relevance_max_percentile"] > 99).all()


def test_geojson_is_rfc7946_and_what_qupath_reads(heatmaps, run):
    out, _, _ = heatmaps
    text = (out / "qupath" / "slide-001.geojson").read_text()
    collection = geojson.loads(text)
    assert collection.is_valid, collection.errors()
    assert collection["type"] == "FeatureCollection"
    heat = np.load(out / "relevance" / "slide-001.npy")
    assert len(collection["features"]) == np.isfinite(heat).sum()
    cell_px = 128  # 64 µm cells on a 0.5 µm/px slide
    for feature in collection["features"]:
        polygon = shape(feature["geometry"])
        assert polygon.is_valid and polygon.exterior.is_ccw and polygon.area == cell_px ** 2
        props = feature["properties"]
        assert props["objectType"] == "tile" and set(props["measurements"]) == {
            "NIC relevance", "NIC relevance cohort percentile", "NIC tissue fraction"}
        assert all(isinstance(v, float) and np.isfinite(v) for v in props["measurements"].values())
        x0, y0, x1, y1 = polygon.bounds
        row, col = int(y0 // cell_px), int(x0 // cell_px)
        assert props["measurements"]["NIC relevance"] == pytest.approx(float(heat[row, col]), rel=1e-6)
        assert 0 <= x0 < x1 <= GRID * cell_px and 0 <= y0 < y1 <= GRID * cell_px
    assert "NaN" not in text


def test_overlay_is_a_tiled_pyramid_at_the_slides_scale(heatmaps, run, tmp_path):
    out, _, _ = heatmaps
    heat = np.load(out / "relevance" / "slide-001.npy")
    with tifffile.TiffFile(out / "overlay" / "slide-001.tif") as tif:
        page = tif.pages[0]
        assert (page.tilewidth, page.tilelength) == (256, 256) and page.extrasamples == (2,)  # unassociated alpha
        assert page.tags["XResolution"].value == (1250, 1)  # px/cm: 8 µm/px, 16x the 0.5 µm/px slide
        image = tif.series[0].asarray()
    assert image.shape == (GRID * 128 // 16, GRID * 128 // 16, 4)
    lesion_cell = np.unravel_index(np.nanargmax(heat), heat.shape)
    quiet = np.isnan(heat)
    assert image[lesion_cell[0] * 8 + 4, lesion_cell[1] * 8 + 4, 3] > 150  # hot cell opaque
    assert (image[::8, ::8][quiet][:, 3] == 0).all()  # background transparent
    # a large slide: levels halve down to one tile, each level a SubIFD with its own resolution
    rgba = np.random.default_rng(0).integers(0, 255, (300, 500, 4), dtype=np.uint8)
    centres = lambda n: (np.arange(n) + 0.5) * 64.0  # noqa: E731
    path = write_overlay_tiff(tmp_path / "big.tif", rgba, centres(500), centres(300), 64.0, 0.25, (128000, 76800))
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert tif.series[0].is_pyramidal and overlay_downsample(64.0, 0.25) == 32
        assert [lvl.shape[:2] for lvl in levels] == [(2400, 4000), (1200, 2000), (600, 1000), (300, 500), (150, 250)]
        assert tif.pages[0].pages[0].tags["XResolution"].value[0] == pytest.approx(1e4 / (0.25 * 64), rel=1e-3)
        np.testing.assert_array_equal(levels[3].asarray(), rgba)  # 64 µm per px: one px per cell


@pytest.mark.slow  # two heatmap runs
def test_a_finer_store_draws_a_finer_map(run, tmp_path):
    dense = dense_copy(run["store"], tmp_path / "s64.zarr", run["ids"])
    frame = explain_cohort(run["store"], run["run"], tmp_path / "fine", masks_dir=run["masks"], fine_store=dense)
    heat = np.load(tmp_path / "fine" / "relevance" / "slide-001.npy")
    assert heat.shape == (2 * GRID - 1, 2 * GRID - 1) and (frame["cell_um"] == 32.0).all()
    coarse = explain_cohort(run["store"], run["run"], tmp_path / "coarse", masks_dir=run["masks"])
    np.testing.assert_allclose(frame["score"], coarse["score"], rtol=1e-6)  # scored on the model's own store
    # the mean model's cell contribution depends on the cell's code alone: the dense cells that hold
    # the coarse cells' patches get the coarse map's values, in the right place
    np.testing.assert_allclose(heat[::2, ::2], np.load(tmp_path / "coarse" / "relevance" / "slide-001.npy"), rtol=1e-5)
    assert frame["lesion_auc"].dropna().min() > 0.8  # straddling cells blur the edge of these copied codes
    grid_model = SimpleNamespace(entry=SimpleNamespace(input="grid"), name="nic-cnn")
    with pytest.raises(NicError, match="needs a bag model"):
        _check_fine_store(grid_model, None, None, "slide-000")
