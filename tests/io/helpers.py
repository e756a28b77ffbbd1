"""Shared test data for the io tests: real slide names, a generated Aperio-style pyramid, bad files."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import tifffile

CMU = ("slides", "CMU-1-Small-Region.svs")
TCGA_J2K = ("slides", "TCGA-CR-7395-01A-01-TS1.svs")
TCGA_DICOM = ("slides", "TCGA-XK-AAJU-01A-01-TS1_small_dicom.dcm")
READERS = ("cucim", "openslide")


def smooth_image(size: int = 1024) -> np.ndarray:
    """A smooth RGB pattern that survives JPEG and 2x downsampling with small error."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rgb = np.stack(
        [128 + 100 * np.sin(xx / 40), 128 + 100 * np.cos(yy / 30), 128 + 90 * np.sin((xx + yy) / 60)], axis=-1
    )
    return rgb.astype(np.uint8)


def write_aperio_tiff(path, image: np.ndarray, mpp: float = 0.5, levels: int = 3, compression="jpeg"):
    """A pyramidal tiled TIFF with an Aperio-style description (levels as separate IFDs)."""
    height, width = image.shape[:2]
    header = f"Aperio Image Library v12.0.0 \n{width}x{height} [0,0 {width}x{height}] (256x256) JPEG Q=90"
    with tifffile.TiffWriter(path) as tiff:
        level = image
        for index in range(levels):
            description = (
                f"{header}|AppMag = 20|MPP = {mpp}"
                if index == 0
                else f"Aperio Image Library v12.0.0 \n{width}x{height} -> {level.shape[1]}x{level.shape[0]} JPEG Q=90"
            )
            extra = {"compressionargs": {"level": 90}} if compression == "jpeg" else {}
            tiff.write(level, tile=(256, 256), compression=compression, photometric="rgb",
                       description=description, metadata=None, **extra)
            h, w = level.shape[0] // 2, level.shape[1] // 2
            level = level[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean((1, 3)).round().astype(np.uint8)
    return path


def truncated_copy(source, path, keep: int):
    path.write_bytes(source.read_bytes()[:keep])
    return path


def written(path, data: bytes):
    path.write_bytes(data)
    return path


def run_nic(*args) -> subprocess.CompletedProcess:
    """`nic ARGS` in a fresh interpreter, so stderr holds everything the C readers print too."""
    code = "from nic_pipeline.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)


def diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))


def damage_tiles(source, path, tiles, how: str, page: int = 0):
    """Copy of a tiled TIFF with the JPEG data of ``tiles`` (tile indices in ``page``) damaged:
    ``"flip"`` inverts 64 bytes in the middle of each tile, ``"zero"`` zeroes its first 600 bytes
    (the JPEG header), as the issue's fault injection did."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        spans = [(int(tif.pages[page].dataoffsets[i]), int(tif.pages[page].databytecounts[i])) for i in tiles]
    for offset, count in spans:
        if how == "flip":
            start = offset + count // 2
            data[start : start + 64] = bytes(b ^ 0xFF for b in data[start : start + 64])
        else:
            data[offset : offset + min(600, count)] = bytes(min(600, count))
    path.write_bytes(bytes(data))
    return path


def claim_size(source, path, width: int, height: int, fill_tiles: bool):
    """Copy of a one-level, little-endian tiled TIFF whose header claims ``width`` x ``height`` px.

    With ``fill_tiles`` the tile tables are rewritten for that size, every tile pointing at the
    first tile's bytes (300,000 x 300,000 px in 256 px tiles gives an 11 MB file, as in the
    issue); without, the tables keep the original few tiles."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        page = tif.pages[0]
        entry_at = {code: page.tags[code].offset for code in (256, 257, 324, 325)}
        columns, rows = -(-width // page.tilewidth), -(-height // page.tilelength)
        first_offset, first_count = int(page.dataoffsets[0]), int(page.databytecounts[0])

    def entry(code: int, count: int, value: int) -> bytes:  # one IFD entry of type LONG
        return struct.pack("<HHII", code, 4, count, value)

    data[entry_at[256] : entry_at[256] + 12] = entry(256, 1, width)
    data[entry_at[257] : entry_at[257] + 12] = entry(257, 1, height)
    if fill_tiles:
        offsets_at = len(data)
        data += np.full(columns * rows, first_offset, "<u4").tobytes()
        counts_at = len(data)
        data += np.full(columns * rows, first_count, "<u4").tobytes()
        data[entry_at[324] : entry_at[324] + 12] = entry(324, columns * rows, offsets_at)
        data[entry_at[325] : entry_at[325] + 12] = entry(325, columns * rows, counts_at)
    path.write_bytes(bytes(data))
    return path
