"""Metrics against hand-computed reference values."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from nic_pipeline.classify.metrics import (
    auc,
    balanced_accuracy,
    c_index,
    json_safe,
    multiclass_auc,
    spearman,
    format_spread,
    summarize_folds,
    task_metrics,
)


def test_auc_reference():
    # pairs (pos, neg): (0.35 vs 0.1 ok, 0.35 vs 0.4 wrong, 0.8 vs both ok) -> 3/4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)  # a tie counts one half
    assert math.isnan(auc([1, 1, 1], [0.2, 0.3, 0.4]))


def test_multiclass_auc_reference():
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    assert multiclass_auc([0, 1, 2, 0], probs) == pytest.approx(1.0)
    assert multiclass_auc([2, 0, 1, 1], probs) < 0.5


def test_balanced_accuracy_reference():
    # recalls: class 0 -> 2/3, class 1 -> 1/1
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx((2 / 3 + 1) / 2)


def test_spearman_reference():
    # ranks of scores [5, 6, 7, 8, 7] are [1, 2, 3.5, 5, 3.5]; rho = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2, 3], [1, 1, 1]))


def test_c_index_reference():
    time = [1, 2, 3, 4]
    assert c_index(time, [4, 3, 2, 1], [1, 1, 1, 1]) == pytest.approx(1.0)  # earlier event, higher risk
    assert c_index(time, [1, 2, 3, 4], [1, 1, 1, 1]) == pytest.approx(0.0)
    # censored at t=2: admissible pairs (0,1) (0,2) (0,3) (2,3); only (2,3) is discordant -> 3/4
    assert c_index(time, [0.9, 0.5, 0.3, 0.6], [1, 0, 1, 1]) == pytest.approx(0.75)
    # a tied risk in pair (2,3) counts one half -> 3.5/4
    assert c_index(time, [0.9, 0.5, 0.6, 0.6], [1, 0, 1, 1]) == pytest.approx(0.875)
    assert math.isnan(c_index(time, [1, 2, 3, 4], [0, 0, 0, 0]))


def test_task_metrics_per_task():
    binary = pd.DataFrame({"target": [0, 0, 1, 1], "score": [0.1, 0.6, 0.7, 0.9]})
    assert task_metrics("binary", binary) == {"n": 4, "auc": 1.0, "balanced_accuracy": 0.75}
    multi = pd.DataFrame({"target": [0, 1, 2], "score_a": [0.7, 0.2, 0.1], "score_b": [0.2, 0.7, 0.1],
                          "score_c": [0.1, 0.1, 0.8]})
    assert task_metrics("multiclass", multi, ["a", "b", "c"])["accuracy"] == 1.0
    reg = pd.DataFrame({"target": [1.0, 2.0, 3.0], "score": [1.5, 2.0, 2.5]})
    out = task_metrics("regression", reg)
    assert out["spearman"] == pytest.approx(1.0) and out["mae"] == pytest.approx(1 / 3)
    surv = pd.DataFrame({"time": [1, 2, 3, 4], "event": [1, 0, 1, 1], "score": [0.9, 0.5, 0.3, 0.6]})
    assert task_metrics("survival", surv)["c_index"] == pytest.approx(0.75)


def test_fold_summary_and_strict_json():
    summary = summarize_folds([{"auc": 0.8, "n": 3}, {"auc": 1.0, "n": 3}, {"auc": math.nan, "n": 2}])
    assert summary == {"auc": {"mean": pytest.approx(0.9), "std": pytest.approx(0.1), "min": 0.8, "max": 1.0,
                               "n_folds": 2}}
    assert format_spread(summary["auc"]) == "0.900 ± 0.100, 0.800-1.000 over 2"
    assert format_spread(summarize_folds([{"auc": math.nan}])["auc"]) == "no fold defined it"
    text = json.dumps(json_safe({"a": math.nan, "b": [np.float32(1.5), math.inf]}), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.5, None]}
