"""Slides in: one reader module per backend behind one :class:`Slide` interface, µm/px rules,
file checks, mask readers (docs/slides.md).

Layout, in the manner of xarray's ``backends/``: ``base`` (the interface and resampling),
``cucim_backend`` and ``openslide_backend`` (one reader each), ``metadata`` (µm/px), ``files``
(finding and checking files), ``masks``. :func:`open_slide` below is the one place that chooses
a backend.
"""

from __future__ import annotations

import os
from pathlib import Path

from nic_pipeline.errors import NicError, SlideError
from nic_pipeline.io.base import Slide, SlideBackend, resample
from nic_pipeline.io.cucim_backend import CucimReader
from nic_pipeline.io.files import (
    SUFFIXES,
    TIFF_SUFFIXES,
    SlideRow,
    check_file,
    discover_slides,
    find_slides,
    read_slide_list,
    slide_id_of,
    why_unreadable,
)
from nic_pipeline.io.metadata import read_mpp_csv, valid_mpp
from nic_pipeline.io.openslide_backend import OpenSlideReader
from nic_pipeline.io.tiff import JpegTiles
from nic_pipeline.runtime.device import cupy_gpu

__all__ = [
    "SUFFIXES",
    "Slide",
    "SlideRow",
    "discover_slides",
    "find_slides",
    "open_slide",
    "read_mpp_csv",
    "read_slide_list",
    "resample",
    "slide_id_of",
]

BACKENDS: dict[str, type[SlideBackend]] = {"cucim": CucimReader, "openslide": OpenSlideReader}
"""Readers in order of preference: the first that claims a file and opens it reads it."""
READERS = ("auto", *BACKENDS)
DEVICES = ("cpu", "cuda")


def open_slide(
    path: str | os.PathLike,
    mpp: float | None = None,
    reader: str = "auto",
    device: str = "cpu",
    check_tiles: bool = True,
) -> Slide:
    """Open a slide with the first backend that claims and opens it (cuCIM, else OpenSlide),
    or the one ``reader`` names; ``mpp`` overrides the metadata. Bad input is a SlideError.

    ``check_tiles``: decode each JPEG tile under a read strictly, once, so that a corrupt tile
    raises instead of giving black or garbage pixels; a single region read to the CPU from YCbCr
    tiles is then decoded from the tiles themselves (docs/slides.md, Corrupt tiles)."""
    if reader not in READERS:
        raise NicError(f"unknown reader {reader!r} (choose from {', '.join(READERS)})")
    if device not in DEVICES:
        raise NicError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if device == "cuda" and not cupy_gpu():
        raise NicError("device='cuda' was asked for but no CUDA GPU is available")
    path = check_file(Path(path))
    if mpp is not None:
        mpp = valid_mpp(mpp)
    candidates = [BACKENDS[reader]] if reader != "auto" else [b for b in BACKENDS.values() if b.guess_can_open(path)]
    errors = {}
    for backend in candidates:
        try:
            opened = backend(path, device)
        except Exception as err:  # the C readers raise assorted types; why_unreadable explains
            errors[backend.name] = str(err).replace(f"Reading {path}: ", "")
            continue
        checked = check_tiles and path.suffix.lower() in TIFF_SUFFIXES
        tiles = JpegTiles.for_levels(path, opened.level_dimensions, opened.level_downsamples) if checked else None
        return Slide(path, opened, mpp_override=mpp, device=device, jpeg_tiles=tiles)
    raise SlideError(path, why_unreadable(path, errors))
