"""Slide-level training as a Dask graph and prediction, on the generated cohort, on a 2-worker
cluster."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from nic_models.slide_models import get_slide_model_spec
from nic_pipeline.classify import predict_cohort, resolve_params, train_cohort
from nic_pipeline.classify.explain import explain_cohort
from nic_pipeline.classify.graph import _warn_if_long
from nic_pipeline.classify.labels import write_splits
from nic_pipeline.classify.metrics import auc
from nic_pipeline.cli import main
from nic_pipeline.errors import NicError
from tests.classify.cohort import N_SLIDES, make_cohort

FAST = {
    "nic-cnn": dict(crop=32, steps=150, batch_size=16, lr=3e-3, lr_final_ratio=0.1, width=64, dropout=0.1),
    "abmil": dict(epochs=15, lr=2e-3, batch_size=4),
}


@pytest.mark.parametrize("model", ["nic-cnn", "abmil"])
@pytest.mark.slow
def test_cross_validation_in_parallel_finds_lesion_slides(cohort, client, tmp_path, model):
    store, labels, masks = cohort
    run = tmp_path / model
    metrics = train_cohort(store, labels, run, model=model, folds=3, client=client, params=FAST[model])
    assert metrics["pooled"]["auc"] >= 0.9, metrics["pooled"]

    oof = pd.read_csv(run / "oof_predictions.csv")
    assert list(oof.columns[:4]) == ["slide_id", "fold", "split", "label"] and "score" in oof.columns
    assert (oof["split"] == "test").all()
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

    heat = explain_cohort(store, run, tmp_path / "heat", masks_dir=masks,
                          slide_ids=[f"slide-{i:03d}" for i in range(1, 12, 2)])
    assert (tmp_path / "heat" / "slide-001.png").exists()
    summary = json.loads((tmp_path / "heat" / "heatmaps.json").read_text())
    assert summary["n_slides_with_lesion"] == 6
    assert heat["lesion_auc"].median() >= 0.85, heat[["slide_id", "score", "lesion_auc"]]


@pytest.mark.parametrize("task", ["multiclass", "regression", "survival"])
@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_train_predict_heatmap(client, tmp_path):
    store, labels, masks = make_cohort(tmp_path / "small", n_slides=12)
    runner = CliRunner()
    run = tmp_path / "run"
    address = client.scheduler.address
    result = runner.invoke(main, ["train", str(store), "--labels", str(labels), "--out", str(run), "--model", "max",
                                  "--folds", "3", "--scheduler", address, "--param", "epochs=200"])
    assert result.exit_code == 0, result.output
    assert "out-of-fold, pooled over held-out slides: auc=" in result.output and (run / "metrics.json").exists()
    assert re.search(r"auc=[01]\.\d{3} \(folds [01]\.\d{3} ± \d\.\d{3}, [01]\.\d{3}-[01]\.\d{3} over 3\)",
                     result.output), result.output
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["evaluation"].startswith("out-of-fold") and saved["pooled"]["evaluation"].startswith("out-of-fold")
    assert all(m["evaluation"].startswith("out-of-fold") for m in saved["per_fold"])
    assert {"mean", "std", "min", "max", "n_folds"} <= set(saved["mean_over_folds"]["auc"])
    result = runner.invoke(main, ["predict", str(store), "--model", str(run), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    scored = pd.read_csv(tmp_path / "p.csv")
    assert len(scored) == 12 and scored["in_training_set"].all()  # the training store: all in-sample
    said = [line for line in result.output.splitlines() if "training set" in line]
    assert len(said) == 1 and "12 of them were in the model's training set: their scores are in-sample" in said[0]

    # each fold's split in CLAM's format; the same splits given back reproduce the folds
    oof = pd.read_csv(run / "oof_predictions.csv", dtype={"slide_id": str})
    for k in range(3):
        split = pd.read_csv(run / "splits" / f"splits_{k}.csv", dtype=str, index_col=0)
        assert list(split.columns) == ["train", "val", "test"] and split["val"].isna().all()
        assert sorted(split["test"].dropna()) == sorted(oof.loc[oof["fold"] == k, "slide_id"])
        assert set(split["train"].dropna()) | set(split["test"].dropna()) == set(oof["slide_id"])
    again = tmp_path / "again"
    result = runner.invoke(main, ["train", str(store), "--labels", str(labels), "--out", str(again), "--model", "max",
                                  "--splits", str(run / "splits"), "--scheduler", address, "--param", "epochs=20"])
    assert result.exit_code == 0, result.output
    redone = pd.read_csv(again / "oof_predictions.csv", dtype={"slide_id": str})
    assert redone[["slide_id", "fold"]].equals(oof[["slide_id", "fold"]])
    assert json.loads((again / "metrics.json").read_text())["splits"] == str(run / "splits")
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


@pytest.mark.slow
def test_slides_without_a_label_are_counted_in_metrics(cohort, client, tmp_path):
    store, labels, _ = cohort
    frame = pd.read_csv(labels)
    frame.loc[[0, 5], "label"] = np.nan
    with pytest.warns(UserWarning, match="slide-000, slide-005"):
        metrics = train_cohort(store, frame, tmp_path / "run", model="mean", folds=3, client=client)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["slides_without_label"] == 2 and saved["slides_without_label_ids"] == ["slide-000", "slide-005"]
    assert saved["unlabelled_slides_in_store"] == 0 and metrics["n_slides"] == N_SLIDES - 2

    # the two unlabelled slides are new to the final model; the others were in its training set
    with pytest.warns(UserWarning, match=f"{N_SLIDES - 2} of {N_SLIDES} scored slides were in the model's training"):
        scored = predict_cohort(store, tmp_path / "run", tmp_path / "scores.csv")
    written = pd.read_csv(tmp_path / "scores.csv", dtype={"slide_id": str}).set_index("slide_id")
    assert not written.loc["slide-000", "in_training_set"] and not written.loc["slide-005", "in_training_set"]
    assert written["in_training_set"].sum() == N_SLIDES - 2 and list(scored.columns[:2]) == ["slide_id", "in_training_set"]


@pytest.mark.slow
def test_fixed_splits_train_on_train_and_score_test_and_val_apart(cohort, client, tmp_path):
    store, labels, _ = cohort
    ids = [f"slide-{i:03d}" for i in range(N_SLIDES)]
    split = tmp_path / "splits_0.csv"
    write_splits(tmp_path, [{"train": ids[:16], "val": ids[16:20], "test": ids[20:]}])
    metrics = train_cohort(store, labels, tmp_path / "run", model="mean", client=client, splits=split)
    oof = pd.read_csv(tmp_path / "run" / "oof_predictions.csv", dtype={"slide_id": str})
    assert sorted(oof.loc[oof["split"] == "test", "slide_id"]) == ids[20:]
    assert sorted(oof.loc[oof["split"] == "val", "slide_id"]) == ids[16:20]
    assert metrics["folds"] == 1 and metrics["n_slides"] == len(ids[20:]) == metrics["pooled"]["n"]
    assert metrics["val_per_fold"][0]["n"] == 4
    config = json.loads((tmp_path / "run" / "folds" / "fold-0" / "config.json").read_text())
    assert config["training_slides"] == ids[:16]  # val and test never trained on
    assert (tmp_path / "run" / "splits" / "splits_0.csv").read_text() == split.read_text()
    bad = tmp_path / "bad"
    write_splits(bad, [{"train": ids[:10] + ["slide-999"], "val": [], "test": ids[10:]}])
    with pytest.raises(NicError, match="slide-999"):
        train_cohort(store, labels, tmp_path / "x", model="mean", client=client, splits=bad)


@pytest.mark.slow
def test_progress_inside_folds_reaches_the_client(cohort, client, tmp_path, capfd):
    store, labels, _ = cohort
    params = dict(crop=16, steps=40, batch_size=2, width=8)
    train_cohort(store, labels, tmp_path / "run", model="nic-cnn", folds=2, client=client, params=params)
    err = capfd.readouterr().err
    assert "nic-cnn: 2 folds + final model" in err and "120/120" in err and "step" in err
    reported = [sum(msg for _, msg in events) for topic, events in client.get_events().items()
                if topic.startswith("nic-train-")]
    assert 120 in reported  # every step of the 3 tasks was reported from the workers


@pytest.mark.slow
def test_a_long_cpu_run_is_announced_with_an_estimate(client):
    entry = get_slide_model_spec("nic-cnn")
    params = resolve_params(entry)
    jobs = [(k, [f"s{i}" for i in range(30)], []) for k in range(5)]
    with pytest.warns(UserWarning, match=r"nic-cnn on CPU workers will take about .* per fold task \(2000 steps"):
        _warn_if_long(client, entry, params, 128, jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_long(client, entry, dict(params, steps=2, crop=16, width=8), 16, jobs)
