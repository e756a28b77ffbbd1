"""`nic train` on damaged stores and bad labels (issue 13): a corrupt chunk is one line naming the
slide (exit 2); labels without a value are left out with a warning naming them; `tumor` and
`tumor ` are one class; a header with spaces is read; an `inf` regression label and an empty
CSV are refused with one line. The stores are copies of one compressed slide (training only
needs codes, not distinct ones): no encoding in this module."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.faults.helpers import nic, noise, one_error_line

pytestmark = pytest.mark.slow

SLIDES = [f"s{i}" for i in range(1, 9)]
TRAIN = ("--model", "mean", "--folds", "2", "--workers", "1")


@pytest.fixture(scope="module")
def cohort_store(tmp_path_factory, finished_store):
    """A finished store of 8 slides (copies of one compressed slide), as a run leaves it."""
    store = tmp_path_factory.mktemp("train") / "cohort.zarr"
    shutil.copytree(finished_store[0], store)
    for slide_id in SLIDES:
        shutil.copytree(store / "good1", store / slide_id)
    shutil.rmtree(store / "good1")
    return store


def labels(tmp_path, text: str):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


SIX = "slide_id,label\n" + "".join(f"s{i},{'tumor' if i < 4 else 'normal'}\n" for i in range(1, 7))


def train_damaged(cohort_store, folder, damage):
    """`nic train` on a copy of the store whose slide s4 has its first shard damaged by ``damage``."""
    store = folder / "damaged.zarr"
    shutil.copytree(cohort_store, store)
    damage(store / "s4" / "features" / "c" / "0" / "0" / "0")
    return nic("train", store, "--labels", labels(folder, SIX), "--out", folder / "run", *TRAIN)


def flip_a_bit(shard) -> None:
    data = bytearray(shard.read_bytes())
    data[20] ^= 0x40
    shard.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def corrupt_chunk_run(cohort_store, tmp_path_factory):
    """`nic train` on the store with one bit flipped in a chunk of slide s4."""
    return train_damaged(cohort_store, tmp_path_factory.mktemp("corrupt"), flip_a_bit)


def test_a_corrupt_chunk_stops_training_with_a_line_naming_the_slide(corrupt_chunk_run):
    assert corrupt_chunk_run.returncode == 2, corrupt_chunk_run.stderr
    errors = [line for line in corrupt_chunk_run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "of slide 's4'" in errors[0] and "recompress this slide" in errors[0]


def test_a_corrupt_chunk_prints_no_traceback(corrupt_chunk_run):
    assert not noise(corrupt_chunk_run), noise(corrupt_chunk_run)


def test_a_deleted_shard_stops_training_with_a_line_naming_the_slide(cohort_store, tmp_path):
    done = train_damaged(cohort_store, tmp_path, lambda shard: shard.unlink())
    assert done.returncode == 2, done.stdout
    assert "'s4'" in one_error_line(done)


@pytest.fixture(scope="module")
def messy_labels_run(cohort_store, tmp_path_factory):
    """One `nic train` with a header `slide_id , label`, `tumor` beside `tumor `, an empty and a
    NaN label: (the run, its run folder)."""
    folder = tmp_path_factory.mktemp("messy")
    table = labels(folder, "slide_id , label\ns1,tumor\ns2,tumor \ns3,tumor\ns4,normal\ns5,normal\ns6, normal\n"
                           "s7,\ns8,NaN\n")
    return nic("train", cohort_store, "--labels", table, "--out", folder / "run", *TRAIN), folder / "run"


def test_a_header_with_spaces_is_read(messy_labels_run):
    done, _ = messy_labels_run
    assert done.returncode == 0, done.stderr
    assert "mean binary, 6 slides, 2 folds" in done.stdout


def test_labels_differing_in_spaces_are_one_class(messy_labels_run):
    metrics = json.loads((messy_labels_run[1] / "metrics.json").read_text())
    assert metrics["classes"] == ["normal", "tumor"] and metrics["n_slides"] == 6


def test_slides_without_a_label_are_named_in_a_warning(messy_labels_run):
    warned = [line for line in messy_labels_run[0].stderr.splitlines() if "without a label" in line]
    assert len(warned) == 1 and "2 slide(s) without a label left out: s7, s8" in warned[0]


def test_the_warning_is_one_plain_line(messy_labels_run):
    done = messy_labels_run[0]
    assert not noise(done), noise(done)


def test_an_inf_regression_label_is_refused_naming_the_slide(cohort_store, tmp_path):
    table = labels(tmp_path, "slide_id,label\ns1,1\ns2,2\ns3,3\ns4,inf\ns5,5\ns6,6\n")
    done = nic("train", cohort_store, "--labels", table, "--out", tmp_path / "run", "--task", "regression", *TRAIN)
    assert done.returncode == 2
    line = one_error_line(done)
    assert "s4=" in line and "finite" in line
    assert not (tmp_path / "run").exists()


def test_an_empty_labels_csv_is_refused(cohort_store, tmp_path):
    table = labels(tmp_path, "")
    done = nic("train", cohort_store, "--labels", table, "--out", tmp_path / "run", *TRAIN)
    assert done.returncode == 2
    assert "the labels CSV is empty" in one_error_line(done)
