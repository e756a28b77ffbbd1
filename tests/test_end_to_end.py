"""The README's main job, as a user runs it: `nic demo` synthesizes a cohort, compresses it on
the embedded cluster, cross-validates a slide classifier and draws heatmaps. With an easy
lesion fraction the classifier must really learn."""

import json
import subprocess
import sys

import pandas as pd
import pytest


@pytest.mark.slow
def test_nic_demo_learns_an_easy_cohort_end_to_end(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "nic_pipeline", "demo", str(out), "--slides", "12", "--size", "3072",
               "--lesion-fraction", "0.3", "--model", "abmil", "--folds", "3", "--workers", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    labels = pd.read_csv(out / "slides" / "labels.csv")
    assert len(labels) == 12 and labels["label"].sum() == 6
    assert "dashboard: http" in result.stdout

    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["pooled"]["auc"] >= 0.9, metrics["pooled"]
    oof = pd.read_csv(out / "run" / "oof_predictions.csv")
    assert sorted(oof["slide_id"]) == sorted(labels["slide_id"]) and oof["fold"].nunique() == 3

    assert sorted(p.stem for p in (out / "views").glob("*.png")) == sorted(labels["slide_id"])
    heat = pd.read_csv(out / "heatmaps" / "heatmaps.csv")
    positives = heat[heat["slide_id"].isin(labels.loc[labels["label"] == 1, "slide_id"])]
    assert positives["lesion_auc"].median() >= 0.8  # the explanation points at the lesion
    # every number printed is out of fold: heatmaps come from the fold model that held the slide out
    assert heat["model"].str.startswith("out of fold").all()
    assert '"out_of_fold_heatmap_lesion_auc"' in result.stdout and '"heatmap_lesion_auc"' not in result.stdout
