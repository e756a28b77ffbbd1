"""``nic probe``: linear probing of patch codes with group-aware cross-validation.

How good is an encoder's code for a task it was not trained for? Fit the simplest model on
the frozen codes -- standardisation + logistic regression (classification) or ridge regression
(regression) -- and score it on held-out groups: ``StratifiedGroupKFold`` / ``GroupKFold``, so
copies of one original tile (LC25000 groups) or patches of one image never sit on both sides.
Metrics are computed on the pooled out-of-fold predictions: accuracy, balanced accuracy and AUC
(macro one-vs-rest for more than two classes), or Spearman / Pearson / R² for regression.

Where a data set has its own held-out split (PatchCamelyon's ``valid``), :func:`holdout_probe`
fits once on the training rows and scores the held-out rows instead of cross-validating
(``nic probe --split-column split --train-split train --test-split valid``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
from sklearn.metrics import accuracy_score, balanced_accuracy_score, r2_score, roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nic_pipeline.errors import NicError


def load_features(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(features (N, C), paths (N,))`` from an ``nic embed`` .npz."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with z:
            return z["features"], z["paths"].astype(str)
    except (OSError, KeyError, ValueError) as exc:
        raise NicError(f"{path}: not an nic embed feature file ({exc})") from exc


def align_labels(paths: Sequence[str], labels_csv: str | Path, label_column: str = "label",
                 group_column: str | None = "group", path_column: str = "path"):
    """Labels (and groups) for each feature row, matched on the relative path.

    Returns ``(rows, y, groups)``: the feature rows that have a label, their labels and groups
    (each path its own group when the CSV has no group column).
    """
    table = pd.read_csv(labels_csv)
    for column in (path_column, label_column):
        if column not in table.columns:
            raise NicError(f"{labels_csv}: no {column!r} column (columns: {list(table.columns)})")
    table = table.dropna(subset=[label_column])
    index = {Path(p).as_posix(): i for i, p in enumerate(paths)}
    keyed = table[path_column].map(lambda p: index.get(Path(str(p)).as_posix(), -1))
    table = table[keyed.to_numpy() >= 0]
    if not len(table):
        raise NicError(f"{labels_csv}: no {path_column!r} matches a path in the feature file "
                       "(paths must be relative to the TILES given to `nic embed`)")
    rows = keyed[keyed >= 0].to_numpy()
    groups = (table[group_column].astype(str).to_numpy() if group_column and group_column in table.columns
              else table[path_column].astype(str).to_numpy())
    return rows, table[label_column].to_numpy(), groups


def infer_kind(y: np.ndarray) -> str:
    """"regression" for numeric labels with many distinct values, else "classification"."""
    if np.issubdtype(np.asarray(y).dtype, np.number) and len(np.unique(y)) > 10:
        return "regression"
    return "classification"


def make_splitter(kind: str, y, groups, n_splits: int, seed: int):
    """Group-aware folds: StratifiedGroupKFold (classification) or GroupKFold (regression)."""
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise NicError(f"group-aware cross-validation needs at least 2 groups, got {n_groups}")
    n_splits = min(n_splits, n_groups)
    if kind == "classification":
        return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return GroupKFold(n_splits=n_splits)


RIDGE_ALPHAS = tuple(np.logspace(-2, 4, 13))


def make_model(kind: str, C: float = 1.0, alpha: float | None = None, seed: int = 0):
    """Standardisation + LogisticRegression (classification) or ridge regression.

    The ridge penalty is chosen per training fold by efficient leave-one-out (``RidgeCV`` over
    1e-2..1e4) unless ``alpha`` is given: codes of 128 to 1024 dimensions on a few hundred
    patches need it.
    """
    if kind == "classification":
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, random_state=seed))
    ridge = RidgeCV(alphas=RIDGE_ALPHAS) if alpha is None else Ridge(alpha=alpha)
    return make_pipeline(StandardScaler(), ridge)


def out_of_fold(X, y, groups, kind: str, n_splits: int = 5, seed: int = 0, C: float = 1.0,
                alpha: float | None = None) -> tuple[np.ndarray, list]:
    """Out-of-fold predictions: class probabilities ``(N, K)`` (classes sorted) or values ``(N,)``."""
    X = np.asarray(X, dtype=np.float64)
    splitter = make_splitter(kind, y, groups, n_splits, seed)
    base = make_model(kind, C=C, alpha=alpha, seed=seed)
    classes = np.unique(y) if kind == "classification" else None
    pred = np.zeros((len(y), len(classes))) if kind == "classification" else np.zeros(len(y))
    folds = []
    for train, test in splitter.split(X, y, groups):
        model = clone(base).fit(X[train], y[train])
        if kind == "classification":
            cols = np.searchsorted(classes, model.classes_)
            pred[np.ix_(test, cols)] = model.predict_proba(X[test])
        else:
            pred[test] = model.predict(X[test])
        folds.append(test)
    return pred, folds


def score(kind: str, y, pred) -> dict:
    """Metrics of pooled out-of-fold predictions (see the module docstring)."""
    if kind == "classification":
        classes = np.unique(y)
        y_idx = np.searchsorted(classes, y)
        hard = pred.argmax(1)
        out = {"accuracy": float(accuracy_score(y_idx, hard)),
               "balanced_accuracy": float(balanced_accuracy_score(y_idx, hard))}
        if len(classes) == 2:
            out["auc"] = float(roc_auc_score(y_idx, pred[:, 1]))
        else:
            prob = pred / np.clip(pred.sum(1, keepdims=True), 1e-12, None)
            out["auc"] = float(roc_auc_score(y_idx, prob, multi_class="ovr", average="macro"))
        return out
    y = np.asarray(y, dtype=float)
    return {"spearman": float(spearmanr(y, pred).statistic), "pearson": float(pearsonr(y, pred).statistic),
            "r2": float(r2_score(y, pred))}


def probe(X, y, groups=None, kind: str = "auto", n_splits: int = 5, seed: int = 0, C: float = 1.0,
          alpha: float | None = None) -> dict:
    """Linear probe of features ``X`` for labels ``y`` with group-aware CV: a dict of metrics."""
    y = np.asarray(y)
    groups = np.asarray(groups) if groups is not None else np.arange(len(y)).astype(str)
    kind = infer_kind(y) if kind == "auto" else kind
    if kind == "regression":
        y = y.astype(float)
    pred, folds = out_of_fold(X, y, groups, kind, n_splits=n_splits, seed=seed, C=C, alpha=alpha)
    result = {"kind": kind, "n": int(len(y)), "n_groups": int(len(np.unique(groups))),
              "n_splits": len(folds), "code_dim": int(np.asarray(X).shape[1])}
    if kind == "classification":
        result["classes"] = [str(c) for c in np.unique(y)]
    result.update(score(kind, y, pred))
    return result


def holdout_probe(X, y, test, kind: str = "auto", seed: int = 0, C: float = 1.0,
                  alpha: float | None = None) -> dict:
    """Linear probe fitted on the rows where ``test`` is False, scored on the rows where it is True."""
    X, y, test = np.asarray(X, dtype=np.float64), np.asarray(y), np.asarray(test, bool)
    if not test.any() or test.all():
        raise NicError(f"a held-out probe needs training and test rows (got {int((~test).sum())} "
                       f"training, {int(test.sum())} test)")
    kind = infer_kind(y) if kind == "auto" else kind
    if kind == "regression":
        y = y.astype(float)
    model = make_model(kind, C=C, alpha=alpha, seed=seed).fit(X[~test], y[~test])
    if kind == "classification":
        classes = np.unique(y)
        pred = np.zeros((int(test.sum()), len(classes)))
        pred[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(X[test])
    else:
        pred = model.predict(X[test])
    result = {"kind": kind, "n": int(test.sum()), "n_train": int((~test).sum()), "code_dim": int(X.shape[1])}
    if kind == "classification":
        result["classes"] = [str(c) for c in np.unique(y)]
    result.update(score(kind, y[test], pred))
    return result


METRIC_ORDER = ("accuracy", "balanced_accuracy", "auc", "spearman", "pearson", "r2")


def format_table(results: dict[str, dict]) -> str:
    """A fixed-width text table: one row per probe, the metrics as columns."""
    metrics = [m for m in METRIC_ORDER if any(m in r for r in results.values())]
    width = max([len("features")] + [len(k) for k in results])
    lines = [f"{'features':<{width}}  {'n':>6} {'groups':>6}  " + "  ".join(f"{m:>17}" for m in metrics)]
    for name, r in results.items():
        cells = "  ".join(f"{r[m]:>17.4f}" if m in r else f"{'-':>17}" for m in metrics)
        lines.append(f"{name:<{width}}  {r['n']:>6} {r.get('n_groups', '-'):>6}  {cells}")
    return "\n".join(lines)


def read_splits(labels_csv: str | Path, rows_paths: Sequence[str], split_column: str, train_split: str,
                test_split: str, path_column: str = "path") -> tuple[np.ndarray, np.ndarray]:
    """``(keep, test)`` masks over ``rows_paths``: rows of either split, and which are the test split."""
    table = pd.read_csv(labels_csv)
    if split_column not in table.columns:
        raise NicError(f"{labels_csv}: no {split_column!r} column (columns: {list(table.columns)})")
    split = dict(zip(table[path_column].map(lambda p: Path(str(p)).as_posix()), table[split_column].astype(str)))
    which = np.asarray([split.get(Path(p).as_posix(), "") for p in rows_paths])
    keep = (which == train_split) | (which == test_split)
    if not (which == test_split).any() or not (which == train_split).any():
        raise NicError(f"{labels_csv}: needs rows of both splits {train_split!r} and {test_split!r} "
                       f"in {split_column!r}")
    return keep, which == test_split


def run_probe(features_npz: str | Path, labels_csv: str | Path, label_column: str = "label",
              group_column: str | None = "group", kind: str = "auto", n_splits: int = 5, seed: int = 0,
              out_json: str | Path | None = None, split_column: str | None = None,
              train_split: str = "train", test_split: str = "valid") -> dict:
    """``nic probe``: load features and labels, probe, optionally write the result as JSON.

    With ``split_column`` the probe is fitted on the ``train_split`` rows and scored on the
    ``test_split`` rows (:func:`holdout_probe`) instead of group-aware cross-validation.
    """
    X, paths = load_features(features_npz)
    rows, y, groups = align_labels(paths, labels_csv, label_column, group_column)
    if split_column:
        keep, test = read_splits(labels_csv, paths[rows], split_column, train_split, test_split)
        result = holdout_probe(X[rows][keep], y[keep], test[keep], kind=kind, seed=seed)
        result.update({"split_column": split_column, "train_split": train_split, "test_split": test_split})
    else:
        result = probe(X[rows], y, groups, kind=kind, n_splits=n_splits, seed=seed)
    result.update({"features": str(features_npz), "labels": str(labels_csv), "label_column": label_column,
                   "group_column": group_column if group_column else None})
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result
