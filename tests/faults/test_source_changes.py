"""Slide files changed in place after compression, keeping their size (issue 21): 64 bytes rewritten
in the middle, one bit flipped inside a tissue JPEG tile, two tiles' offsets swapped. No decoder
sees the last two; the whole-file fingerprint does. A plain rerun trusts an unchanged size and
mtime; `--verify` (and `--redo-changed`) hash the whole file whatever the mtime says."""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest
import tifffile

from tests.faults.conftest import BLOCK
from tests.faults.helpers import nic, noise, tissue_tiles

pytestmark = pytest.mark.slow


def rewrite_middle(path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def flip_a_bit_in_a_tile(path) -> None:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tile = tissue_tiles(path, 1)[0]
        at = int(page.dataoffsets[tile]) + int(page.databytecounts[tile]) // 2
    data = bytearray(path.read_bytes())
    data[at] ^= 0x08
    path.write_bytes(bytes(data))


def swap_two_tiles(path) -> None:
    """Swap the offsets and byte counts of two tissue tiles in level 0's tile tables."""
    first, second = tissue_tiles(path, 2)
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        tables = [(tags[code].valueoffset, tags[code].dtype_name) for code in (324, 325)]
        byteorder = tif.byteorder
    data = bytearray(path.read_bytes())
    for start, dtype in tables:
        fmt = byteorder + {"LONG": "I", "LONG8": "Q", "SHORT": "H"}[dtype]
        size = struct.calcsize(fmt)
        a, b = start + first * size, start + second * size
        data[a:a + size], data[b:b + size] = data[b:b + size], data[a:a + size]
    path.write_bytes(bytes(data))


CHANGES = {  # slide id: (change, whether the old mtime is put back)
    "touched": (rewrite_middle, False),
    "rewritten": (rewrite_middle, True),
    "bitflip": (flip_a_bit_in_a_tile, True),
    "swapped": (swap_two_tiles, True),
}
CHANGED = "the slide file changed since it was compressed; pass --redo-changed to compress it again"


@pytest.fixture(scope="module")
def changed(tmp_path_factory, finished_store, good_slides):
    """A finished store of one copy of the clean slide per change, the slide files changed in place
    after it, and three reruns: plain, --verify, and --redo-changed --verify of the swapped one."""
    root = tmp_path_factory.mktemp("sources")
    store = root / "store.zarr"
    shutil.copytree(finished_store[0], store)
    for slide_id, (change, keep_mtime) in CHANGES.items():
        path = shutil.copy2(good_slides[0], root / f"{slide_id}.tif")
        shutil.copytree(store / "good1", store / slide_id)
        before = os.stat(path)
        size = before.st_size
        change(root / f"{slide_id}.tif")
        assert os.stat(path).st_size == size
        if keep_mtime:
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    shutil.rmtree(store / "good1")
    slides = [root / f"{slide_id}.tif" for slide_id in CHANGES]
    args = ("--out", store, "--workers", "2", "--block", BLOCK)
    return dict(root=root, store=store, plain=nic("compress", *slides, *args),
                verified=nic("compress", *slides, *args, "--verify"),
                redone=nic("compress", root / "swapped.tif", *args, "--redo-changed", "--verify"))


def failed(done) -> dict[str, str]:
    lines = [line[len("FAILED "):] for line in done.stderr.splitlines() if line.startswith("FAILED ")]
    return {os.path.basename(path)[:-len(".tif")]: reason for path, reason in (line.split(": ", 1) for line in lines)}


def test_a_plain_rerun_sees_a_change_with_a_new_mtime_only(changed):
    plain = changed["plain"]
    assert plain.returncode == 1 and not noise(plain), plain.stderr
    assert failed(plain) == {"touched": CHANGED}  # the others kept their mtime: not hashed (docs/reliability.md)


def test_verify_sees_every_change_of_the_same_size(changed):
    verified = changed["verified"]
    assert verified.returncode == 1 and not noise(verified), verified.stderr
    assert failed(verified) == {slide_id: CHANGED for slide_id in CHANGES}


def test_redo_changed_compresses_the_changed_file_again(changed):
    """The swapped tiles decode: the slide is encoded again from the file as it now is (the rewritten
    bytes would fail it as a corrupt JPEG tile, which is right too)."""
    redone = changed["redone"]
    assert redone.returncode == 0 and not noise(redone), redone.stderr
    assert "1/1 slides complete" in redone.stdout and " 0 patches encoded" not in redone.stdout


def test_the_unchanged_tiles_still_decode(changed):
    """The bit flip and the swap are invisible to a decoder: the reason the fingerprint must see them."""
    for slide_id in ("bitflip", "swapped"):
        image = tifffile.imread(changed["root"] / f"{slide_id}.tif", key=0)
        assert image.shape[:2] == (2048, 2048) and np.ptp(image) > 0
