"""Bad option values and misleading messages (issue 21).

Every numeric option is checked by its click type before anything runs: one `error:` line naming
the option, exit 2 (`--mpp 0`, `nan`, `inf` ended in a Dask traceback dump and ZeroDivisionError,
`--mpp -1` in "smaller than one 128 px patch"). And three files whose FAILED line was wrong: a
symlink loop (was "broken symbolic link"), 1 px/cm resolution tags (was "no µm/px"), 12-bit data
in a 16-bit TIFF (was "blank")."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from tests.faults.helpers import nic, noise, one_error_line

BAD_VALUES = [  # (command and arguments before the option, option, value, what the line says)
    (("compress", "{slide}", "--out", "{out}"), "--mpp", "0", "0.0 is not in the range x>0"),
    (("compress", "{slide}", "--out", "{out}"), "--mpp", "-1", "-1.0 is not in the range x>0"),
    (("compress", "{slide}", "--out", "{out}"), "--mpp", "nan", "'nan' is not a finite number"),
    (("compress", "{slide}", "--out", "{out}"), "--mpp", "inf", "'inf' is not a finite number"),
    (("compress", "{slide}", "--out", "{out}"), "--min-tissue", "1.5", "1.5 is not in the range 0<=x<=1"),
    (("compress", "{slide}", "--out", "{out}"), "--block", "0", "0 is not in the range x>=1"),
    (("compress", "{slide}", "--out", "{out}"), "--workers", "0", "0 is not in the range x>=1"),
    (("compress", "{slide}", "--out", "{out}"), "--wait-timeout", "-5", "-5.0 is not in the range x>=0"),
    (("info", "{slide}"), "--mpp", "nan", "'nan' is not a finite number"),
    (("synth", "{out}"), "--width", "0", "0 is not in the range x>=1"),
    (("synth", "{out}"), "--stain-jitter", "nan", "'nan' is not a finite number"),
    (("preview", "{slide}", "--out", "{out}"), "--mpp", "0", "0.0 is not in the range x>0"),
    (("train", "{slide}", "--labels", "{slide}", "--out", "{out}"), "--seed", "-1", "-1 is not in the range x>=0"),
    (("embed", "{slide}", "--out", "{out}"), "--batch-size", "0", "0 is not in the range x>=1"),
    (("train-encoder", "{slide}"), "--lr", "nan", "'nan' is not a finite number"),
]


@pytest.mark.parametrize("command, option, value, says", BAD_VALUES,
                         ids=[f"{c[0]} {o} {v}" for c, o, v, _ in BAD_VALUES])
def test_a_bad_numeric_option_is_one_line(tmp_path, good_slides, command, option, value, says):
    args = [a.format(slide=good_slides[0], out=tmp_path / "out") for a in command]
    done = nic(*args, option, value, timeout=120)
    if "No such command" in done.stderr:
        pytest.skip(f"no command {command[0]!r} here")
    assert done.returncode == 2
    assert one_error_line(done) == f"error: Invalid value for '{option}': {says}" + ("" if "finite" in says else ".")
    assert not (tmp_path / "out").exists()


def twelve_bit(path, rgb: np.ndarray) -> None:
    """A tiled, two-level 16-bit RGB TIFF whose samples go up to 4095 only."""
    data = rgb.astype(np.uint16) * 16
    with tifffile.TiffWriter(path) as tif:
        tif.write(data, tile=(256, 256), photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
        tif.write(data[::4, ::4], tile=(256, 256), photometric="rgb", subfiletype=1)


def one_px_per_cm(path, rgb: np.ndarray) -> None:
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="jpeg", resolution=(1, 1),
                     resolutionunit="CENTIMETER")


@pytest.fixture(scope="module")
def messages(tmp_path_factory, good_slides):
    """ONE `nic compress` over a folder of a symlink loop, a 1 px/cm TIFF and a 12-bit TIFF."""
    folder = tmp_path_factory.mktemp("messages") / "cohort"
    folder.mkdir()
    os.symlink("loop-b.svs", folder / "loop-a.svs")
    os.symlink("loop-a.svs", folder / "loop-b.svs")
    rgb = tifffile.imread(good_slides[0], key=0)
    one_px_per_cm(folder / "onecm.tif", rgb)
    twelve_bit(folder / "twelve.tif", rgb)
    store = folder.parent / "store.zarr"
    return nic("compress", folder, "--out", store, "--workers", "1"), folder


EXPECTED = {
    "loop-a.svs": "symbolic link loop (loop-a.svs -> loop-b.svs -> ... never reaches a file)",
    "onecm.tif": "its TIFF resolution tags say 1 px per centimeter (10000 µm/px), not a microscope's "
                 "(0.01 to 100 µm/px), so no µm/px is known; pass --mpp X (µm/px of level 0) or --mpp-csv FILE "
                 "with columns slide_id,mpp",
    "twelve.tif": "16-bit samples holding 12-bit data (largest value 4080 of 65535): read at 8 bits (the top 8 of 16) "
                  "the slide is all but black; scale it to the full 16-bit range, or to 8 bits, first",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_failed_line_says_what_is_wrong(messages, name):
    done, folder = messages
    assert done.returncode == 1 and not noise(done), done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("FAILED ") and f"/{name}:" in line]
    assert len(lines) == 1 and lines[0].endswith(f"{name}: {EXPECTED[name]}"), done.stderr
