"""pipeline/io/files.py: finding slides, and bad files caught before a C reader sees them."""

from __future__ import annotations

import pytest

from pipeline.errors import SlideError
from pipeline.io import find_slides, open_slide
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
