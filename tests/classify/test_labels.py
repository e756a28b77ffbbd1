"""Labels CSV, targets and folds."""

from __future__ import annotations

import pandas as pd
import pytest

from nic_pipeline.classify import assign_folds, encode_targets, load_labels, target_spec
from nic_pipeline.classify.labels import read_splits, write_splits
from nic_pipeline.errors import NicError


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


def test_labels_without_a_value_are_reported_by_slide(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,1\nb,\nc,0\nd,NaN\ne,1\n")
    with pytest.warns(UserWarning, match=r"2 slide\(s\) without a label left out: b, d"):
        frame = load_labels(path, "binary")
    assert frame["slide_id"].tolist() == ["a", "c", "e"] and frame.attrs["without_label"] == ["b", "d"]


def test_labels_and_column_names_are_stripped(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id , label \na,tumor\nb,tumor \nc, normal\nd,normal\n")
    frame = load_labels(path, "binary")
    assert target_spec(frame, "binary")["classes"] == ["normal", "tumor"]
    assert encode_targets(frame, target_spec(frame, "binary"))["target"].tolist() == [1, 1, 0, 0]


def test_non_finite_targets_are_refused_naming_the_slide(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,1.5\nb,inf\nc,2.0\n")
    with pytest.raises(NicError, match="b=inf"):
        target_spec(load_labels(path, "regression"), "regression")
    path.write_text("slide_id,time,event\na,3,1\nb,-inf,0\nc,5,1\n")
    with pytest.raises(NicError, match="b=-inf"):
        target_spec(load_labels(path, "survival"), "survival")


def test_an_empty_labels_csv_is_one_clear_error(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("")
    with pytest.raises(NicError, match="labels CSV is empty"):
        load_labels(path, "binary")


def test_too_many_folds_says_how_many_can_be_made():
    labels = pd.DataFrame({"slide_id": [f"s{i}" for i in range(8)], "label": [i % 2 for i in range(8)]})
    with pytest.raises(NicError, match="cannot make 5 folds from 8 slides .*use fewer --folds: at most 4"):
        assign_folds(labels, "binary", 5)
    assert set(assign_folds(labels, "binary", 4)) == {0, 1, 2, 3}
    grouped = labels.assign(group=[f"p{i // 4}" for i in range(8)])  # 2 patients, both classes each
    with pytest.raises(NicError, match="at most 2"):
        assign_folds(grouped, "binary", 3)


def test_splits_in_clams_format_round_trip_and_errors_name_the_file(tmp_path):
    # as CLAM's create_splits_seq.py writes them: an index column, columns of unequal length
    (tmp_path / "splits_0.csv").write_text(",train,val,test\n0,007,010,012\n1,008,,013\n2,009,,\n")
    (tmp_path / "splits_1.csv").write_text(",train,val,test\n0,012,007,008\n1,013,,\n")
    (tmp_path / "splits_0_bool.csv").write_text(",train,val,test\n007,True,False,False\n")  # CLAM's other file
    splits = read_splits(tmp_path)
    assert splits == [{"train": ["007", "008", "009"], "val": ["010"], "test": ["012", "013"]},
                      {"train": ["012", "013"], "val": ["007"], "test": ["008"]}]  # zero padding kept
    assert read_splits(tmp_path / "splits_1.csv") == splits[1:]
    out = tmp_path / "out"
    write_splits(out, splits)
    assert (out / "splits_0.csv").read_text() == (tmp_path / "splits_0.csv").read_text()
    assert read_splits(out) == splits

    (tmp_path / "twice.csv").write_text(",train,val,test\n0,a,,a\n")
    with pytest.raises(NicError, match="twice.csv: slide a is listed in train and test"):
        read_splits(tmp_path / "twice.csv")
    (tmp_path / "cols.csv").write_text(",training,testing\n0,a,b\n")
    with pytest.raises(NicError, match="cols.csv: splits CSV lacks column"):
        read_splits(tmp_path / "cols.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NicError, match="no splits_K.csv"):
        read_splits(tmp_path / "empty")


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_classes_that_differ_only_in_case_are_refused_naming_them(task):
    labels = pd.DataFrame({"slide_id": list("abcdef"), "label": ["tumor", "Tumor", "TUMOR", "normal", "normal", "other"]})
    with pytest.raises(NicError, match="differ only in case: TUMOR, Tumor, tumor"):
        target_spec(labels, task)
