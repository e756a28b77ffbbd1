"""Labels CSV, targets and folds."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.classify import assign_folds, load_labels
from pipeline.errors import NicError


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
