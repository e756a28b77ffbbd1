"""Slide-level evaluation metrics, from well-kept libraries.

AUC and balanced accuracy come from scikit-learn, Spearman's rho from SciPy, Harrell's
concordance index from lifelines. Each function returns a plain float (NaN where the metric
is undefined, e.g. an AUC on a fold with a single class), so results go straight into JSON.
"""

from __future__ import annotations

import math

import numpy as np


def auc(labels, scores) -> float:
    """ROC AUC of binary labels (0/1) against scores; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, np.asarray(scores, dtype=float)))


def multiclass_auc(labels, probabilities, classes=None) -> float:
    """Macro one-vs-rest AUC of integer labels against (n, K) class probabilities."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=float)
    k = probabilities.shape[1]
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if len(present) < k:  # sklearn needs every class present for multi-class OvR: average the present ones
        return float(np.mean([auc(labels == c, probabilities[:, c]) for c in present]))
    if k == 2:
        return auc(labels, probabilities[:, 1])
    probabilities = probabilities / probabilities.sum(1, keepdims=True)
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro",
                               labels=list(range(k))))


def balanced_accuracy(labels, predictions) -> float:
    """Mean per-class recall (sklearn balanced_accuracy_score)."""
    from sklearn.metrics import balanced_accuracy_score

    if len(labels) == 0:
        return math.nan
    return float(balanced_accuracy_score(np.asarray(labels), np.asarray(predictions)))


def spearman(values, scores) -> float:
    """Spearman rank correlation (scipy.stats.spearmanr); NaN for constant inputs."""
    from scipy.stats import spearmanr

    values, scores = np.asarray(values, dtype=float), np.asarray(scores, dtype=float)
    if len(values) < 2 or np.ptp(values) == 0 or np.ptp(scores) == 0:
        return math.nan
    return float(spearmanr(values, scores).statistic)


def c_index(time, risk, event) -> float:
    """Harrell's concordance index of risk scores (higher = earlier event), via lifelines.

    lifelines expects scores that grow with survival time, so the risk is negated.
    """
    from lifelines.utils import concordance_index

    time, risk, event = (np.asarray(a, dtype=float) for a in (time, risk, event))
    if len(time) < 2 or event.sum() == 0:
        return math.nan
    try:
        return float(concordance_index(time, -risk, event))
    except ZeroDivisionError:  # no admissible pairs
        return math.nan


def task_metrics(task: str, frame, classes=None) -> dict:
    """Metrics of one prediction table (the columns written to oof_predictions.csv) for a task.

    binary: auc, balanced_accuracy (threshold 0.5); multiclass: auc (macro OvR),
    balanced_accuracy, accuracy; regression: spearman, mae, rmse; survival: c_index.
    """
    out: dict = {"n": int(len(frame))}
    if len(frame) == 0:
        return out
    if task == "binary":
        y = frame["target"].to_numpy().astype(int)
        s = frame["score"].to_numpy(dtype=float)
        out.update(auc=auc(y, s), balanced_accuracy=balanced_accuracy(y, (s >= 0.5).astype(int)))
    elif task == "multiclass":
        y = frame["target"].to_numpy().astype(int)
        probs = frame[[f"score_{c}" for c in classes]].to_numpy(dtype=float)
        pred = probs.argmax(1)
        out.update(auc=multiclass_auc(y, probs), balanced_accuracy=balanced_accuracy(y, pred),
                   accuracy=float(np.mean(pred == y)))
    elif task == "regression":
        y = frame["target"].to_numpy(dtype=float)
        s = frame["score"].to_numpy(dtype=float)
        out.update(spearman=spearman(y, s), mae=float(np.mean(np.abs(y - s))),
                   rmse=float(np.sqrt(np.mean((y - s) ** 2))))
    elif task == "survival":
        out.update(c_index=c_index(frame["time"], frame["score"], frame["event"]))
    else:
        raise ValueError(f"unknown task {task!r}")
    return out


OUT_OF_FOLD = ("out-of-fold: each slide scored by the fold model that did not train on it; "
               "scores of the final model on its own training slides would be in-sample")


def summarize_folds(fold_metrics: list[dict]) -> dict:
    """Mean, standard deviation (population, over folds), minimum, maximum and number of folds of
    each numeric metric (NaNs ignored: a fold with a single class has no AUC)."""
    keys = sorted({k for m in fold_metrics for k, v in m.items() if isinstance(v, float)})
    summary = {}
    for key in keys:
        values = np.array([m.get(key, math.nan) for m in fold_metrics], dtype=float)
        values = values[~np.isnan(values)]
        some = len(values) > 0
        summary[key] = {"mean": float(values.mean()) if some else math.nan,
                        "std": float(values.std()) if some else math.nan,
                        "min": float(values.min()) if some else math.nan,
                        "max": float(values.max()) if some else math.nan, "n_folds": int(len(values))}
    return summary


def format_spread(summary: dict) -> str:
    """One metric's spread over folds as text: ``0.912 ± 0.041, 0.860-0.970 over 5``."""
    if not summary.get("n_folds") or summary.get("mean") is None or math.isnan(summary["mean"]):
        return "no fold defined it"
    return (f"{summary['mean']:.3f} ± {summary['std']:.3f}, {summary['min']:.3f}-{summary['max']:.3f} "
            f"over {summary['n_folds']}")


def json_safe(obj):
    """Replace NaN/inf floats by None (strict JSON) recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj
