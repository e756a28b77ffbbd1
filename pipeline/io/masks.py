"""Mask images beside slides or tiles, read and written in one place.

``nic synth`` writes ``<slide>_lesion.png`` and ``<slide>_tissue.png`` (0/255, one pixel per
``nic:mask_downsample`` level-0 px, recorded in the PNG); MoNuSeg-style nucleus masks are plain
binary images. Any non-zero grey value is foreground.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from nic_pipeline.errors import NicError

DOWNSAMPLE_KEY = "nic:mask_downsample"


def mask_path(slide_path: str | os.PathLike, kind: str) -> Path:
    """``<slide stem>_<kind>.png`` beside the slide."""
    slide_path = Path(slide_path)
    return slide_path.with_name(f"{slide_path.stem}_{kind}.png")


def _resolve(path: str | os.PathLike, kind: str | None) -> Path:
    path = Path(path)
    if kind and not path.name.endswith(f"_{kind}.png"):
        path = mask_path(path, kind)
    if not path.exists():
        what = f"no {kind} mask" if kind else "mask not found"
        raise NicError(f"{path}: {what} (nic synth writes them beside each slide)")
    return path


def read_mask(path: str | os.PathLike, kind: str | None = None) -> np.ndarray:
    """A mask as bool (h, w). With ``kind``, ``path`` may be the slide: its ``_<kind>.png`` is read."""
    with Image.open(_resolve(path, kind)) as image:
        return np.asarray(image.convert("L")) > 0


def mask_downsample(path: str | os.PathLike, kind: str | None = None) -> int | None:
    """Level-0 px per mask px, as recorded by :func:`write_mask`; None when not recorded."""
    with Image.open(_resolve(path, kind)) as image:
        value = image.info.get(DOWNSAMPLE_KEY)
    return int(value) if value else None


def write_mask(path: str | os.PathLike, mask: np.ndarray, downsample: int, **text: str) -> Path:
    """Write a bool mask as a 0/255 PNG recording its downsample (and any other ``text``)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(DOWNSAMPLE_KEY, str(downsample))
    for key, value in text.items():
        info.add_text(f"nic:{key}", str(value))
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(path, pnginfo=info)
    return Path(path)
