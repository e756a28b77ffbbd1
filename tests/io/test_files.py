"""pipeline/io/files.py: finding slides, and bad files caught before a C reader sees them."""

from __future__ import annotations

import os

import pytest

from nic_pipeline.errors import NicError, SlideError
from nic_pipeline.io import discover_slides, find_slides, open_slide, read_slide_list
from tests.conftest import shared_path
from tests.io.helpers import CMU, TCGA_DICOM, run_nic, truncated_copy, written


def test_find_slides_recurses_filters_sorts_and_deduplicates(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    for name in ("a.svs", "b/deep/c.NDPI", "b/d.tiff", "b/notes.txt", "b/e.png", "z.mrxs"):
        (tmp_path / name).write_bytes(b"x")
    found = find_slides([tmp_path, tmp_path / "a.svs", tmp_path / "b"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.svs", "b/d.tiff", "b/deep/c.NDPI", "z.mrxs"]


def test_find_slides_names_a_missing_path(tmp_path):
    with pytest.raises(SlideError, match="nowhere.*no such file or directory"):
        find_slides([tmp_path, tmp_path / "nowhere"])


def test_find_slides_rejects_an_explicit_unsupported_file(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"x")
    with pytest.raises(SlideError, match=r"photo.png: unsupported extension '.png'"):
        find_slides(tmp_path / "photo.png")


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda d: truncated_copy(shared_path(*CMU), d / "cut.svs", 1_000_000), "truncated or corrupt"),
        (lambda d: truncated_copy(shared_path(*CMU), d / "tiny.svs", 300), "truncated or corrupt"),
        (lambda d: written(d / "zero.svs", b""), "empty file"),
        (lambda d: written(d / "text.svs", b"just some text\n"), "not a slide"),
        (lambda d: d / "missing.svs", "no such file"),
        (lambda d: written(d / "slide.png", b"\x89PNG"), "unsupported extension"),
        (lambda d: d, "not a file"),
    ],
)
def test_bad_input_gives_one_slide_error(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    assert caught.value.path == str(path) and reason in caught.value.reason
    assert "\n" not in str(caught.value)


def test_truncated_tile_data_is_caught_before_reading(synthetic, tmp_path):
    path = truncated_copy(synthetic[0], tmp_path / "cut-data.svs", synthetic[0].stat().st_size - 3000)
    with pytest.raises(SlideError, match=r"truncated: image 2 needs \d+ bytes but the file has \d+"):
        open_slide(path)


def test_dicom_non_conformant_gets_a_clear_reason():
    path = shared_path(*TCGA_DICOM)
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a conformant DICOM whole-slide image")
    assert "PixelSpacing" in message and "openslide" in message and "\n" not in message


@pytest.mark.parametrize("name", ["cut.svs", "text.svs"])
def test_nic_info_bad_file_prints_one_line_and_exits_2(tmp_path, name):
    path = tmp_path / name
    if name == "cut.svs":
        truncated_copy(shared_path(*CMU), path, 1_000_000)
    else:
        path.write_text("not a slide\n")
    done = run_nic("info", path)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ")


def test_nic_info_dicom_exits_2_with_reason():
    path = shared_path(*TCGA_DICOM)
    done = run_nic("info", path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "not a conformant DICOM whole-slide image" in done.stderr


# ---------------------------------------------------------------------------- a cohort's problems, one per file


def test_discover_slides_reports_each_bad_file_and_keeps_the_rest(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("good.svs", "..tif", "zarr.json.tif", "__meta.svs", "a.svs", "sub/a.tif", "sub/fine.ndpi"):
        (tmp_path / name).write_bytes(b"II*\x00")
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "folder.tif").mkdir()
    (tmp_path / "notes.txt").write_text("not a slide")
    (tmp_path / "gone.svs").symlink_to(tmp_path / "deleted.svs")
    (tmp_path / "photo.png").write_bytes(b"x")
    slides, problems = discover_slides([tmp_path, tmp_path / "good.svs", tmp_path / "missing.svs", tmp_path / "photo.png"])
    assert slides == [("good", (tmp_path / "good.svs").resolve()), ("fine", (tmp_path / "sub/fine.ndpi").resolve())]
    reasons = {path.name: reason for path, reason in problems}
    assert sorted(reasons) == sorted(["..tif", "zarr.json.tif", "__meta.svs", "a.svs", "a.tif", "empty.svs",
                                      "folder.tif", "gone.svs", "missing.svs", "photo.png"])
    assert "slide id '.' is empty or only dots" in reasons["..tif"]
    assert "collide with the store's own metadata file" in reasons["zarr.json.tif"]
    assert "'__', which Zarr reserves" in reasons["__meta.svs"]
    assert reasons["a.svs"] == f"slide id 'a' is also the id of {(tmp_path / 'sub/a.tif').resolve()}: rename one of them"
    assert reasons["a.tif"] == f"slide id 'a' is also the id of {(tmp_path / 'a.svs').resolve()}: rename one of them"
    assert reasons["empty.svs"] == "empty file (0 bytes)"
    assert reasons["folder.tif"] == "not a file (a directory)"
    assert reasons["gone.svs"] == f"broken symbolic link (to {tmp_path / 'deleted.svs'}, which does not exist)"
    assert reasons["missing.svs"] == "no such file or directory"
    assert reasons["photo.png"].startswith("unsupported extension '.png'")
    assert all("\n" not in reason for reason in reasons.values())


def test_discover_slides_follows_links_and_counts_a_file_once(tmp_path):
    (tmp_path / "real.svs").write_bytes(b"II*\x00")
    (tmp_path / "link.svs").symlink_to(tmp_path / "real.svs")
    assert discover_slides([tmp_path, tmp_path / "real.svs"]) == ([("real", (tmp_path / "real.svs").resolve())], [])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, so chmod 000 cannot make one unreadable")
def test_discover_slides_reports_an_unreadable_file(tmp_path):
    path = tmp_path / "locked.svs"
    path.write_bytes(b"II*\x00")
    path.chmod(0)
    assert discover_slides(tmp_path) == ([], [(path, "cannot read the file (Permission denied)")])


def test_read_slide_list_keeps_good_rows_and_names_each_bad_line(tmp_path):
    (tmp_path / "slides").mkdir()
    for name in ("a.svs", "b.tif", "c.svs", "d.svs"):
        (tmp_path / "slides" / name).write_bytes(b"II*\x00")
    listing = tmp_path / "cohort.csv"
    listing.write_text(
        " Slide_ID , path , mpp \n"
        "A,slides/a.svs,0.25\n"
        f"B,{tmp_path / 'slides/b.tif'},\n"
        "\n"
        "C,slides/missing.svs,\n"
        "D,slides/d.svs,-1\n"
        ",slides/c.svs,\n"
        "E,,\n"
        "zarr.json,slides/c.svs,\n"
        "F,slides/c.svs,\n"
        "F,slides/d.svs,\n"
    )
    rows, problems = read_slide_list(listing)
    assert rows == [("A", (tmp_path / "slides/a.svs").resolve(), 0.25), ("B", (tmp_path / "slides/b.tif").resolve(), None)]
    assert rows[0].slide_id == "A" and rows[0].mpp == 0.25
    reasons = [reason for _, reason in problems]
    assert reasons[0] == "line 5 of cohort.csv: no such file or directory"
    assert reasons[1] == "line 6 of cohort.csv: µm/px must be a positive number, got '-1'"
    assert reasons[2] == "line 7 of cohort.csv: no slide_id"
    assert reasons[3] == "line 8 of cohort.csv: no path"
    assert reasons[4].startswith("line 9 of cohort.csv: slide id 'zarr.json' would collide")
    assert reasons[5:] == [
        f"slide id 'F' is also the id of {(tmp_path / 'slides/d.svs').resolve()}: rename one of them",
        f"slide id 'F' is also the id of {(tmp_path / 'slides/c.svs').resolve()}: rename one of them",
    ]
    assert [path for path, _ in problems][:4] == [tmp_path / "slides/missing.svs", tmp_path / "slides/d.svs",
                                                  tmp_path / "slides/c.svs", listing]


def test_read_slide_list_needs_its_header(tmp_path):
    listing = tmp_path / "no-header.csv"
    listing.write_text("A,slides/a.svs\n")
    with pytest.raises(NicError, match=r"no-header.csv: a slide list needs a header row slide_id,path\[,mpp\] "
                                       r"\(found a,slides/a.svs\)"):
        read_slide_list(listing)
    with pytest.raises(NicError, match="slide list not found"):
        read_slide_list(tmp_path / "nowhere.csv")
