"""Linear probing with group-aware cross-validation (`nic probe`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, cross_val_predict

from nic_pipeline.cli import main
from nic_pipeline.errors import NicError
from nic_pipeline.encoder.probe import align_labels, make_model, out_of_fold, probe, run_probe


def _grouped_classes(n_groups=30, per_group=4, n_classes=3, dim=16, signal=1.5, seed=0):
    """Features with a class signal and a per-group offset (copies of one original look alike)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, signal, (n_classes, dim))
    X, y, g = [], [], []
    for gi in range(n_groups):
        cls = gi % n_classes
        offset = rng.normal(0, 1.0, dim)
        for _ in range(per_group):
            X.append(centres[cls] + offset + rng.normal(0, 0.5, dim))
            y.append(f"c{cls}")
            g.append(f"g{gi}")
    return np.asarray(X), np.asarray(y), np.asarray(g)


def test_classification_metrics_match_sklearn():
    X, y, g = _grouped_classes()
    result = probe(X, y, g, n_splits=5, seed=0)
    cv = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0)
    prob = cross_val_predict(make_model("classification"), X, y, groups=g, cv=cv, method="predict_proba")
    classes = np.unique(y)
    hard = classes[prob.argmax(1)]
    assert result["kind"] == "classification" and result["n"] == 120 and result["n_groups"] == 30
    assert result["accuracy"] == pytest.approx(accuracy_score(y, hard))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, hard))
    assert result["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert result["auc"] > 0.8  # there is a real signal


def test_binary_auc_and_chance_level():
    X, y, g = _grouped_classes(n_classes=2, signal=0.0, seed=1)  # no class signal at all
    result = probe(X, y, g, n_splits=5)
    assert 0.25 < result["auc"] < 0.75
    X, y, g = _grouped_classes(n_classes=2, signal=3.0, seed=1)
    assert probe(X, y, g)["auc"] > 0.95


def test_regression_spearman_matches_sklearn():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(90, 8))
    y = X[:, 0] * 2 + rng.normal(0, 0.5, 90)
    g = np.repeat(np.arange(30), 3).astype(str)
    result = probe(X, y, g, n_splits=5)
    pred = cross_val_predict(make_model("regression"), X, y, groups=g, cv=GroupKFold(n_splits=5))
    assert result["kind"] == "regression"
    assert result["spearman"] == pytest.approx(spearmanr(y, pred).statistic)
    assert result["spearman"] > 0.8


def test_folds_never_split_a_group():
    X, y, g = _grouped_classes(n_groups=20)
    _, folds = out_of_fold(X, y, g, "classification", n_splits=4)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    for test in folds:
        train = np.setdiff1d(np.arange(len(y)), test)
        assert not set(g[test]) & set(g[train])


def test_probe_cli_table_and_json(tmp_path):
    X, y, g = _grouped_classes()
    paths = np.asarray([f"{lab}/t{i}.png" for i, lab in enumerate(y)])
    np.savez(tmp_path / "f.npz", features=X.astype(np.float32), paths=paths)
    csv = tmp_path / "labels.csv"
    # a shuffled CSV with an extra unlabeled row: rows are matched by path, not order
    order = np.random.default_rng(0).permutation(len(y))
    lines = ["path,label,group"] + [f"{paths[i]},{y[i]},{g[i]}" for i in order] + ["other.png,c0,gx"]
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "probe.json"
    res = CliRunner().invoke(main, ["probe", str(tmp_path / "f.npz"), "--labels", str(csv), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "balanced_accuracy" in res.output and "f.npz" in res.output
    written = json.loads(out.read_text())
    expected = probe(X.astype(np.float32), y, g)
    assert written["n"] == 120 and written["auc"] == pytest.approx(expected["auc"])


def test_align_labels_errors(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\na.png,x\n")
    with pytest.raises(NicError, match="'path'"):
        align_labels(["a.png"], csv)
    csv.write_text("path,label\nb.png,x\n")
    with pytest.raises(NicError, match="no 'path' matches"):
        align_labels(["a.png"], csv)
    with pytest.raises(NicError, match="at least 2 groups"):
        probe(np.zeros((2, 3)), ["x", "y"], ["g", "g"])
    np.save(tmp_path / "not.npy", np.zeros(3))
    with pytest.raises(NicError, match="not an nic embed feature file"):
        run_probe(tmp_path / "not.npy", csv)
