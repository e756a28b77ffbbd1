"""Shared test data for the io tests: real slide names, a generated Aperio-style pyramid, bad files."""

from __future__ import annotations

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
    code = "from pipeline.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)


def diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
