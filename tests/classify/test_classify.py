"""Slide-level training as a Dask graph, prediction and heatmaps, on generated compressed cohorts.

The cohort mimics the store written by `nic compress` (Zarr v3 group per slide, features
(feature, y, x) float16 zero off tissue, tissue fraction, µm coordinates, status complete);
positive slides carry a small square of shifted codes among their tissue cells, and a lesion
mask PNG at nic synth's scale (32 level-0 px per mask px).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.classify import (
    SlideSource,
    assign_folds,
    encode_targets,
    fit,
    load_labels,
    predict_cohort,
    target_spec,
    train_cohort,
)
from pipeline.errors import NicError
from pipeline.classify.metrics import auc

GRID, CHANNELS, LESION, CELL_PX, SLIDE_MPP = 32, 16, 8, 128, 0.5
N_SLIDES = 36
MASK_DOWNSAMPLE = 32


def make_cohort(root, n_slides=N_SLIDES, grid=GRID, channels=CHANNELS, seed=0, shift=3.0, lesion_size=LESION):
    """Write cohort.zarr, labels.csv and <slide_id>_lesion.png under ``root``; return paths."""
    import xarray as xr
    from PIL import Image

    rng = np.random.default_rng(seed)
    store, masks = root / "cohort.zarr", root / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    direction = rng.normal(size=channels)
    direction *= shift / np.linalg.norm(direction) * np.sqrt(channels) / 2
    base = rng.normal(size=channels)
    rows = []
    yy, xx = np.mgrid[0:grid, 0:grid] + 0.5
    for i in range(n_slides):
        sid, label = f"slide-{i:03d}", i % 2
        cy, cx = rng.uniform(0.4, 0.6, 2) * grid
        ry, rx = rng.uniform(0.3, 0.45, 2) * grid
        radius = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        tissue = np.clip((1.15 - radius) / 0.3, 0, 1).astype(np.float32)
        codes = base[:, None, None] + rng.normal(size=(channels, grid, grid))
        lesion = np.zeros((grid, grid), bool)
        if label:
            inside = np.argwhere(tissue[:-lesion_size, :-lesion_size] >= 1)
            inside = inside[[tissue[y:y + lesion_size, x:x + lesion_size].min() >= 1 for y, x in inside]]
            y0, x0 = inside[rng.integers(len(inside))]
            lesion[y0:y0 + lesion_size, x0:x0 + lesion_size] = True
            codes[:, lesion] += direction[:, None]
        encoded = tissue >= 0.1
        codes[:, ~encoded] = 0
        px = CELL_PX // MASK_DOWNSAMPLE
        Image.fromarray((np.kron(lesion, np.ones((px, px))) * 255).astype(np.uint8)).save(masks / f"{sid}_lesion.png")
        centres = (np.arange(grid) + 0.5) * CELL_PX * SLIDE_MPP
        ds = xr.Dataset(
            {"features": (("feature", "y", "x"), codes.astype(np.float16)), "tissue": (("y", "x"), tissue)},
            coords={"y": centres, "x": centres, "feature": np.arange(channels)},
            attrs=dict(encoder="synthetic-codes", encoder_sha256="0" * 64, code_dim=channels, mpp=SLIDE_MPP,
                       slide_mpp=SLIDE_MPP, patch_size=CELL_PX, stride=CELL_PX, status="complete"),
        )
        ds.to_zarr(store, group=sid, mode="w", zarr_format=3, consolidated=False)
        rows.append({"slide_id": sid, "label": label, "group": f"patient-{i // 2:03d}"})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return store, labels, masks


# --------------------------------------------------------------------------- fast units


def test_load_labels_names_missing_columns(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,1\nb,0\n")
    assert len(load_labels(path, "binary")) == 2
    with pytest.raises(NicError, match="time, event"):
        load_labels(path, "survival")
    path.write_text("slide_id,label\na,1\na,0\n")
    with pytest.raises(NicError, match="more than once"):
        load_labels(path, "binary")


def test_folds_are_stratified_and_keep_patients_together():
    labels = pd.DataFrame({"slide_id": [f"s{i}" for i in range(30)], "label": [i % 3 == 0 for i in range(30)],
                           "group": [f"p{i // 2}" for i in range(30)]})
    folds = assign_folds(labels, "binary", 3, seed=1)
    assert set(folds) == {0, 1, 2}
    for _, patient in labels.assign(fold=folds).groupby("group"):
        assert patient["fold"].nunique() == 1
    for k in range(3):
        assert labels["label"][folds == k].nunique() == 2
    with pytest.raises(NicError, match="fewer --folds"):
        assign_folds(labels.head(4), "binary", 5)


def test_crops_stream_from_zarr_with_zero_padding(tmp_path):
    store, _, _ = make_cohort(tmp_path, n_slides=2, grid=12, channels=4, lesion_size=3)
    cached, streaming = SlideSource(store, cache_mb=64), SlideSource(store, cache_mb=0)
    full = cached.features("slide-000")
    for y0, x0 in [(-3, -2), (4, 5), (8, 9)]:
        a, ta = cached.crop("slide-000", y0, x0, 6)
        b, tb = streaming.crop("slide-000", y0, x0, 6)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)
        ys, xs = slice(max(y0, 0), y0 + 6), slice(max(x0, 0), x0 + 6)
        np.testing.assert_array_equal(a[:, ys.start - y0:ys.start - y0 + full[:, ys, xs].shape[1],
                                         xs.start - x0:xs.start - x0 + full[:, ys, xs].shape[2]], full[:, ys, xs])
    assert streaming._cached_bytes == 0  # nothing held beyond the crop
    codes, cells = cached.bag("slide-000")
    assert codes.shape == (len(cells), 4)
    assert np.all(np.any(codes != 0, axis=1))

    # training with no cache at all: every crop / bag is read from Zarr when needed
    labels = pd.DataFrame({"slide_id": ["slide-000", "slide-001"], "label": [0, 1]})
    spec = target_spec(labels, "binary")
    for model, params in [("nic-cnn", dict(crop=8, steps=2, batch_size=2, width=8)), ("abmil", dict(epochs=1))]:
        bundle = fit(model, "binary", streaming, ["slide-000", "slide-001"], encode_targets(labels, spec), spec, params)
        assert 0 <= bundle.predict_row(streaming, "slide-001")["score"] <= 1
    assert streaming._cached_bytes == 0


# --------------------------------------------------------------------------- end to end on a 2-worker cluster


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        yield client


FAST = {
    "nic-cnn": dict(crop=32, steps=150, batch_size=16, lr=3e-3, lr_final_ratio=0.1, width=64, dropout=0.1),
    "abmil": dict(epochs=15, lr=2e-3, batch_size=4),
}


@pytest.mark.parametrize("model", ["nic-cnn", "abmil"])
def test_cross_validation_in_parallel_finds_lesion_slides(cohort, client, tmp_path, model):
    store, labels, masks = cohort
    run = tmp_path / model
    metrics = train_cohort(store, labels, run, model=model, folds=3, client=client, params=FAST[model])
    assert metrics["pooled"]["auc"] >= 0.9, metrics["pooled"]

    oof = pd.read_csv(run / "oof_predictions.csv")
    assert list(oof.columns[:3]) == ["slide_id", "fold", "label"] and "score" in oof.columns
    assert len(oof) == N_SLIDES and set(oof["fold"]) == {0, 1, 2}
    for _, patient in oof.assign(group=oof["slide_id"].str[-3:].astype(int) // 2).groupby("group"):
        assert patient["fold"].nunique() == 1  # grouped by patient
    saved = json.loads((run / "metrics.json").read_text())
    assert len(saved["per_fold"]) == 3 and saved["pooled"]["auc"] == pytest.approx(metrics["pooled"]["auc"])
    assert (run / "model.safetensors").exists() and (run / "config.json").exists()
    assert all((run / "folds" / f"fold-{k}" / "model.safetensors").exists() for k in range(3))

    # one task per fold, named after it, run side by side on both workers
    tasks = json.loads((run / "tasks.json").read_text())
    assert sorted(t["key"].rsplit("-", 1)[0] for t in tasks) == sorted(
        [f"train-fold-{k}-{model}" for k in range(3)] + [f"train-final-{model}"])
    assert len({t["worker"] for t in tasks}) == 2
    first, second = sorted(tasks, key=lambda t: t["start"])[:2]
    assert second["start"] < first["end"], "the first two fold tasks did not overlap"

    # the final model scores new slides; the heatmap finds the lesion cells
    preds = predict_cohort(store, run, tmp_path / "preds.csv")
    assert len(preds) == N_SLIDES and (tmp_path / "preds.csv").exists()
    positives = preds["slide_id"].str[-3:].astype(int) % 2 == 1
    assert auc(positives, preds["score"]) >= 0.9

    from pipeline.classify.explain import explain_cohort

    heat = explain_cohort(store, run, tmp_path / "heat", masks_dir=masks,
                          slide_ids=[f"slide-{i:03d}" for i in range(1, 12, 2)])
    assert (tmp_path / "heat" / "slide-001.png").exists()
    summary = json.loads((tmp_path / "heat" / "heatmaps.json").read_text())
    assert summary["n_slides_with_lesion"] == 6
    assert heat["lesion_auc"].median() >= 0.85, heat[["slide_id", "score", "lesion_auc"]]


@pytest.mark.parametrize("task", ["multiclass", "regression", "survival"])
def test_other_tasks_with_the_mean_pooling_baseline(cohort, client, tmp_path, task):
    store, labels, _ = cohort
    frame = pd.read_csv(labels)
    positive = frame["label"].to_numpy()
    rng = np.random.default_rng(0)
    if task == "multiclass":
        frame["label"] = np.where(positive == 1, "lesion", np.where(np.arange(len(frame)) % 4 == 0, "a", "b"))
    elif task == "regression":
        frame["label"] = 3.0 * positive + rng.normal(0, 0.5, len(frame))
    else:
        frame["time"] = 10 - 6 * positive + rng.uniform(0, 3, len(frame))
        frame["event"] = (rng.random(len(frame)) < 0.8).astype(int)
        frame = frame.drop(columns="label")
    metrics = train_cohort(store, frame, tmp_path / task, model="mean", task=task, folds=3, client=client)
    oof = pd.read_csv(tmp_path / task / "oof_predictions.csv")
    if task == "multiclass":
        probs = oof[["score_a", "score_b", "score_lesion"]].to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
        assert metrics["pooled"]["balanced_accuracy"] > 0.5
    elif task == "regression":
        assert metrics["pooled"]["spearman"] > 0.7
    else:
        assert {"time", "event", "score"} <= set(oof.columns)
        assert metrics["pooled"]["c_index"] > 0.75


def test_cli_train_predict_heatmap(client, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    store, labels, masks = make_cohort(tmp_path / "small", n_slides=12)
    runner = CliRunner()
    run = tmp_path / "run"
    address = client.scheduler.address
    result = runner.invoke(main, ["train", str(store), "--labels", str(labels), "--out", str(run), "--model", "max",
                                  "--folds", "3", "--scheduler", address, "--param", "epochs=200"])
    assert result.exit_code == 0, result.output
    assert "auc=" in result.output and (run / "metrics.json").exists()
    result = runner.invoke(main, ["predict", str(store), "--model", str(run), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 12
    result = runner.invoke(main, ["heatmap", str(store), "--model", str(run), "--out", str(tmp_path / "h"),
                                  "--masks", str(masks)])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "h").glob("slide-*.png"))) == 12
    assert "heatmap AUC vs lesion" in result.output

    # expected failures: one line, exit 2, naming the slide and the fix
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,label\nslide-000,0\nnot-compressed,1\n")
    result = runner.invoke(main, ["train", str(store), "--labels", str(bad), "--out", str(tmp_path / "x"),
                                  "--scheduler", address])
    assert result.exit_code == 2 and "not-compressed" in result.output and "compress them" in result.output
    result = runner.invoke(main, ["train", str(store), "--labels", str(labels), "--out", str(tmp_path / "x"),
                                  "--param", "stepz=3", "--scheduler", address])
    assert result.exit_code == 2 and "stepz" in result.output


def test_pca_rgb_separates_code_populations_on_white_background():
    from pipeline.classify.explain import pca_rgb

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(16, 20, 20)).astype(np.float16)
    feats[:, 5:10, 5:10] += 4  # a second population of codes
    tissue = np.ones((20, 20), np.float32)
    tissue[:, :3] = 0
    feats[:, :, :3] = 0
    rgb = pca_rgb(feats, tissue)
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    assert np.all(rgb[:, :3] == 255)
    inside, outside = rgb[5:10, 5:10].reshape(-1, 3).astype(float), rgb[12:, 12:].reshape(-1, 3).astype(float)
    assert np.abs(inside.mean(0) - outside.mean(0)).max() > 100  # the first component splits them
    np.testing.assert_array_equal(pca_rgb(feats, tissue), rgb)  # deterministic colours
    assert np.all(pca_rgb(feats[:2], tissue, background="black")[:, :3] == 0)  # fewer than 3 codes


def test_lesion_mask_to_grid_fractions():
    from pipeline.classify.explain import heatmap_auc, mask_to_grid

    meta = {"shape": (4, 4, 6), "attrs": {}, "y": (np.arange(4) + 0.5) * 64.0, "x": (np.arange(6) + 0.5) * 64.0}
    mask = np.zeros((16, 24), bool)  # 16 µm per mask px: 4 px per 64 µm cell
    mask[4:8, 8:16] = True  # cells (1, 2) and (1, 3)
    mask[8:10, 0:4] = True  # half of cell (2, 0)
    grid = mask_to_grid(mask, meta, (16.0, 16.0))
    expected = np.zeros((4, 6))
    expected[1, 2:4] = 1
    expected[2, 0] = 0.5
    np.testing.assert_allclose(grid, expected)
    heat = np.where(expected >= 0.5, 2.0, 0.0)  # cells at least half lesion count as lesion
    heat[0, 0] = np.nan  # off tissue: ignored
    assert heatmap_auc(heat, grid) == 1.0
