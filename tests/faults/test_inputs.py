"""Bad slide files in one cohort (issue 13): one `nic compress` over a folder that holds every kind
of bad input beside two good slides, plus files, a missing path and a CSV slide list given by
name. Each kind gives one FAILED line naming the file and the reason, no traceback, the good
slides complete, exit code 1, and the store lists each failure (`nic inspect`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.faults.conftest import BLOCK, features
from tests.faults.helpers import KINDS, nic, noise, one_error_line

pytestmark = pytest.mark.slow

EXTRAS = {  # given by name after the folder: (file, reason)
    "unsupported-suffix": ("picture.png", "unsupported extension '.png'"),
    "missing-path": ("nowhere.svs", "no such file or directory"),
    "list-bad-mpp": ("listed_copy.tif", "line 2 of list.csv: µm/px must be a positive number, got 'abc'"),
    "list-missing-file": ("nowhere-listed.svs", "line 3 of list.csv: no such file or directory"),
    "list-no-path": ("list.csv", "line 4 of list.csv: no path"),
}
SLIDE_LIST = "slide_id,path,mpp\nlisted_badmpp,listed_copy.tif,abc\nlisted_missing,nowhere-listed.svs,\nlisted_nopath,,\n"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, good_slides):
    """ONE `nic compress DIR extra/picture.png extra/nowhere.svs extra/list.csv` over every bad kind:
    (the run, `nic inspect`, `nic inspect --json`, the path of each kind made, the store)."""
    root = tmp_path_factory.mktemp("faults")
    folder, extra = root / "cohort", root / "extra"
    folder.mkdir()
    extra.mkdir()
    for good in good_slides:
        shutil.copyfile(good, folder / good.name)
    paths = {kind.name: kind.make(folder, good_slides[0]) for kind in KINDS if not kind.unavailable()}
    (extra / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    shutil.copyfile(good_slides[0], extra / "listed_copy.tif")
    (extra / "list.csv").write_text(SLIDE_LIST)
    paths |= {name: extra / file for name, (file, _) in EXTRAS.items()}
    store = root / "cohort.zarr"
    run = nic("compress", folder, extra / "picture.png", extra / "nowhere.svs", extra / "list.csv", "--out", store,
              "--workers", "2", "--block", BLOCK)
    return run, nic("inspect", store), nic("inspect", "--json", store), paths, store


REASONS = {kind.name: kind.reason for kind in KINDS} | {name: reason for name, (_, reason) in EXTRAS.items()}
UNAVAILABLE = {kind.name: kind.unavailable for kind in KINDS}


def made(cohort, kind: str):
    """The kind's file in the cohort, or skip with the reason it could not be made here."""
    if kind not in cohort[3]:
        pytest.skip(UNAVAILABLE[kind]())
    return cohort[3][kind]


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_each_bad_input_gets_one_line_naming_it(cohort, kind):
    path = made(cohort, kind)
    lines = [line for line in cohort[0].stderr.splitlines() if line.startswith(f"FAILED {path}: ")]
    assert len(lines) == 1, cohort[0].stderr
    assert REASONS[kind] in lines[0]


def test_the_run_fails_with_exit_1_and_no_traceback(cohort):
    run = cohort[0]
    assert run.returncode == 1, run.stderr
    assert not noise(run), noise(run)
    bad = len(cohort[3])
    assert f"2/{bad + 2} slides complete" in run.stdout
    assert len([line for line in run.stderr.splitlines() if line.startswith("FAILED ")]) == bad


def test_only_the_good_slides_are_complete(cohort):
    rows = json.loads(cohort[2].stdout)
    assert sorted(r["slide_id"] for r in rows if r["status"] == "complete") == ["good1", "good2"]
    assert all(r["status"] == "failed" and r["error"] for r in rows if r["slide_id"] not in ("good1", "good2"))


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_inspect_lists_each_failure_with_its_reason(cohort, kind):
    run, listing, as_json = cohort[:3]
    path = made(cohort, kind)
    reason = next(line for line in run.stderr.splitlines() if line.startswith(f"FAILED {path}: ")).split(": ", 1)[1]
    named = (path.stem, str(path))  # a slide's id; a file that never became a slide: its path
    rows = [r for r in json.loads(as_json.stdout) if r["slide_id"] in named]
    assert len(rows) == 1 and rows[0]["status"] == "failed" and rows[0]["error"] == reason
    assert f"FAILED {rows[0]['slide_id']}: {reason}" in listing.stdout.splitlines()


def test_corrupt_tiles_fail_the_slide_instead_of_encoding_garbage(cohort):
    rows = {r["slide_id"]: r for r in json.loads(cohort[2].stdout)}
    for slide_id in ("flipped", "zeroed"):
        assert rows[slide_id]["status"] == "failed" and "corrupt JPEG tile at level 0" in rows[slide_id]["error"]


def test_a_grayscale_slide_is_not_told_about_an_option_it_cannot_pass(cohort):
    line = next(line for line in cohort[0].stderr.splitlines() if "gray.tif" in line)
    assert "require_tissue" not in line and "grayscale" in line


def test_a_white_slide_is_called_blank(cohort):
    line = next(line for line in cohort[0].stderr.splitlines() if "white.tif" in line)
    assert "looks blank" in line and "grayscale" not in line


def test_the_good_slides_get_the_codes_they_get_alone(cohort, finished_store):
    """Thirty bad neighbours change nothing in a good slide's codes."""
    assert np.array_equal(features(cohort[4], "good1"), finished_store[1])


def test_a_bad_value_in_the_mpp_csv_is_one_line_exit_2(tmp_path, good_slides):
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\ngood1,0.5\ngood2,fast\n")
    done = nic("compress", good_slides[0], "--mpp-csv", table, "--out", tmp_path / "s.zarr")
    assert done.returncode == 2
    line = one_error_line(done)
    assert str(table) in line and "line 3" in line and "'fast'" in line
    assert not (tmp_path / "s.zarr").exists()
