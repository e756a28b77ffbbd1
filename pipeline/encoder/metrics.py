"""Validation metrics of ``nic train-encoder``: per task, and the one score early stopping follows."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

SCORE_GROUP_CAP = 100  # validation groups beyond this add no more weight to a task
SCORE_IS = ("mean over tasks of balanced accuracy (classification) / Spearman (regression), "
            f"weighted by sqrt(number of validation groups, at most {SCORE_GROUP_CAP})")


def task_metrics(kind: str, y_true: np.ndarray, output: np.ndarray) -> dict:
    """Validation metrics: balanced accuracy, accuracy and AUC (macro one-vs-rest) for
    classification; Spearman and Pearson correlation for regression."""
    if len(y_true) == 0:
        return {}
    if kind == "classification":
        return _classification_metrics(y_true.astype(int), output)
    pred = output.reshape(-1)
    if np.std(pred) == 0 or np.std(y_true) == 0:
        return {"spearman": 0.0, "pearson": 0.0}
    return {"spearman": float(spearmanr(y_true, pred).statistic), "pearson": float(pearsonr(y_true, pred).statistic)}


def _classification_metrics(y_true: np.ndarray, logits: np.ndarray) -> dict:
    """Accuracies of the argmax, and AUC over the classes present in ``y_true`` (softmax of the logits)."""
    pred = logits.argmax(1)
    out = {"balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
           "accuracy": float(accuracy_score(y_true, pred))}
    present = np.unique(y_true)
    if len(present) < 2:
        return out
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    if logits.shape[1] == 2:
        out["auc"] = float(roc_auc_score(y_true, prob[:, 1]))
        return out
    sub = prob[:, present] / prob[:, present].sum(1, keepdims=True)
    y_sub = np.searchsorted(present, y_true)
    out["auc"] = float(roc_auc_score(y_sub, sub, multi_class="ovr", average="macro")) \
        if len(present) > 2 else float(roc_auc_score(y_sub, sub[:, 1]))
    return out


def primary_metric(kind: str, metrics: dict) -> float:
    """The one number per task that early stopping averages (balanced accuracy / Spearman)."""
    return float(metrics.get("balanced_accuracy", metrics.get("spearman", 0.0)))


def validation_score(tasks: list, metrics: dict, losses: dict) -> float:
    """Early-stopping score: the tasks' primary metrics averaged with weights sqrt(#validation groups).

    A task validated on 5 tiles swings by 0.2 between epochs; weighting by the square root of
    its independent validation samples keeps such tasks from deciding the best epoch alone
    while still counting them. The count is capped at :data:`SCORE_GROUP_CAP`: beyond ~100
    groups a metric is steady, and a big task (PCam, 1,200 validation patches) must not outvote
    the others. Without validation data: minus the training loss.
    """
    values, weights = [], []
    for t in tasks:
        if metrics.get(t.name):
            values.append(primary_metric(t.head_kind, metrics[t.name]))
            weights.append(np.sqrt(min(len(np.unique(t.groups[t.val_idx])), SCORE_GROUP_CAP)))
    if not values:
        return -float(sum(losses.values()))
    return float(np.average(values, weights=weights))
