"""Lesion masks on the grid and the heatmap AUC."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from nic_pipeline.classify import train_cohort
from nic_pipeline.classify.explain import explain_cohort, heatmap_auc, mask_to_grid, score_text
from nic_pipeline.viz.heatmap import HeatScale


def test_lesion_mask_to_grid_fractions():
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


@pytest.mark.slow
def test_heatmaps_share_one_scale_are_out_of_fold_and_name_the_score(cohort, client, tmp_path):
    store, labels, masks = cohort
    run = tmp_path / "run"
    train_cohort(store, labels, run, model="mean", folds=3, client=client)
    ids = [f"slide-{i:03d}" for i in range(6)]
    heat = explain_cohort(store, run, tmp_path / "heat", masks_dir=masks, slide_ids=ids, out_of_fold=True)
    summary = json.loads((tmp_path / "heat" / "heatmaps.json").read_text())
    assert summary["models"].startswith("out of fold") and (heat["evaluation"] == "out-of-fold").all()
    assert heat["model"].str.startswith("out of fold (fold").all() and summary["evaluation"]["out-of-fold"]["n_slides"] == 6
    oof = pd.read_csv(run / "oof_predictions.csv").set_index("slide_id")
    np.testing.assert_allclose(heat.set_index("slide_id")["score"], oof.loc[ids, "score"], rtol=1e-5)
    assert heat["true_label"].tolist() == ["0", "1"] * 3

    scale = HeatScale(**summary["scale"])
    assert scale.cmap == "coolwarm" and scale.vmin == -scale.vmax  # signed contributions
    for sid, label in zip(ids, [0, 1] * 3):  # on the cohort's scale, negatives show no red
        level = scale.normalize()(np.ma.masked_invalid(np.load(tmp_path / "heat" / "relevance" / f"{sid}.npy")))
        red = float(np.mean(level.compressed() > 0.75))
        assert (red < 0.01) if label == 0 else (red > 0.05), (sid, red)


def test_score_is_named_as_what_it_is():
    bundle = SimpleNamespace(task="binary", config={"target": {"classes": ["normal", "tumor"]}})
    assert score_text(bundle, {"score": 0.912}) == "P(tumor) = 0.912"
    numeric = SimpleNamespace(task="binary", config={"target": {"classes": ["0", "1"]}})
    assert score_text(numeric, {"score": 0.5}) == "P(positive, label 1) = 0.500"
    bundle.task = "multiclass"
    assert score_text(bundle, {"score_a": 0.2, "score_b": 0.8, "pred": "b"}) == "predicted b (P = 0.800)"
