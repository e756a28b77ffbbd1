"""The :class:`Slide` interface every reader sits behind, the small :class:`SlideBackend`
contract a reader fulfils, and the resampling that turns level pixels into target-µm/px pixels.

In the manner of xarray's ``backends/``: each storage engine is one module with one reader class
(``cucim_backend``, ``openslide_backend``); :func:`nic_pipeline.io.open_slide` picks the engine in one
place; :class:`Slide` adds what is the same for all of them (µm/px, levels, reads at a target
µm/px, thumbnails, errors that name the file). See docs/slides.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from nic_pipeline.errors import SlideError
from nic_pipeline.io.files import slide_id_of
from nic_pipeline.io.metadata import MPP_FIX, missing_mpp, valid_mpp
from nic_pipeline.io.tiff import JpegTiles
from nic_pipeline.runtime.arrays import array_namespace, skimage

LEVEL_TOLERANCE = 0.01  # a level up to 1 % coarser than the target still counts as "not coarser"
SCALE_TOLERANCE = 0.02
"""Scale factors within 2% of an integer are taken as that integer: a 0.499 µm/px scan read at
0.5 µm/px is not resampled (that is within scanner calibration error, and resampling costs more
than decoding)."""


class SlideBackend(ABC):
    """What a reader module provides: open a file, report its pyramid, read many regions.

    Subclasses set ``name`` and ``suffixes`` and, once opened, ``level_dimensions``,
    ``level_downsamples``, ``format`` (OpenSlide's vendor vocabulary), ``vendor`` and ``decoder``
    (which decoder actually produces the pixels, e.g. ``"cucim-cpu"``).
    """

    name: ClassVar[str] = ""
    suffixes: ClassVar[frozenset[str]] = frozenset()
    decoder: str = ""

    @abstractmethod
    def __init__(self, path: Path, device: str = "cpu"):
        """Open ``path`` for reads to ``device`` (a reader may choose its decoder by it)."""

    @classmethod
    def guess_can_open(cls, path: Path) -> bool:
        """Whether this reader should be tried on ``path`` (by suffix; cheap, never opens it)."""
        return path.suffix.lower() in cls.suffixes

    @abstractmethod
    def metadata_mpp(self) -> float | None:
        """µm/px of level 0 from the file's metadata, or None."""

    @abstractmethod
    def read_many(self, locations, size, level: int, device: str):
        """(n, h, w, 3) uint8 regions of ``size`` (w, h) at ``level``; numpy, or cupy on "cuda"."""

    @abstractmethod
    def close(self):
        """Release the file."""


class Slide:
    """An open whole-slide image: pyramid geometry, µm/px, region reads (numpy, or cupy on GPU)."""

    def __init__(
        self,
        path: Path,
        backend: SlideBackend,
        mpp_override: float | None = None,
        device: str = "cpu",
        jpeg_tiles: JpegTiles | None = None,
    ):
        self.path = path
        self.slide_id = slide_id_of(path)
        self.device = device
        self._backend = backend
        self.reader = backend.name
        self._backend_decoder = backend.decoder
        self._jpeg_tiles = jpeg_tiles
        self._tile_reads = 0
        self.format = backend.format
        self.vendor = backend.vendor
        self.level_dimensions = [tuple(int(v) for v in dims) for dims in backend.level_dimensions]
        self.level_downsamples = [float(d) for d in backend.level_downsamples]
        self.level_count = len(self.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        self.mpp = mpp_override if mpp_override is not None else backend.metadata_mpp()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Slide({str(self.path)!r}, reader={self.reader!r}, mpp={self.mpp})"

    def close(self):
        """Release the reader's file handles."""
        self._backend.close()
        if self._jpeg_tiles is not None:
            self._jpeg_tiles.close()

    def require_mpp(self) -> float:
        """The slide's µm/px, or a SlideError saying how to supply it."""
        if self.mpp is None:
            raise SlideError(self.path, f"µm/px unknown ({missing_mpp(self.path)}): {MPP_FIX}")
        return self.mpp

    def read_region(self, location, size, level: int = 0):
        """RGB uint8 (h, w, 3) of ``size`` (w, h) px at ``level``, top-left ``location`` in level-0 px."""
        return self.read_regions([location], size, level)[0]

    def read_regions(self, locations: Sequence, size, level: int = 0):
        """Batched :meth:`read_region`: (n, h, w, 3) uint8, numpy (cupy when device="cuda")."""
        self._check_level(level)
        locations = [(int(x), int(y)) for x, y in locations]
        size = (int(size[0]), int(size[1]))
        if not locations:
            return empty_batch(size, self.device)
        try:
            return self._read(locations, size, level, self.device)
        except SlideError:
            raise
        except Exception as err:
            where = f"at {locations[0]}" if len(locations) == 1 else f"({len(locations)} regions from {locations[0]})"
            raise SlideError(self.path, f"cannot read {size[0]}x{size[1]} px {where} level {level}: {err}") from err

    def level_mpp(self, level: int) -> float:
        """µm/px of a pyramid level."""
        return self.require_mpp() * self.level_downsamples[level]

    def level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose µm/px is still not coarser than ``target_mpp`` (level 0 if none)."""
        target = valid_mpp(target_mpp) * (1 + LEVEL_TOLERANCE)
        fine_enough = [lvl for lvl in range(self.level_count) if self.level_mpp(lvl) <= target]
        return max(fine_enough, key=lambda lvl: self.level_downsamples[lvl], default=0)

    def read_regions_at_mpp(self, locations: Sequence, size_px, target_mpp: float):
        """(n, h, w, 3) uint8 at ``target_mpp``; ``size_px`` is a side or (w, h) at the target,
        ``locations`` are level-0 px (top-left)."""
        width, height = (size_px, size_px) if np.isscalar(size_px) else size_px
        level = self.level_for_mpp(target_mpp)
        factor = target_mpp / self.level_mpp(level)
        batch = self.read_regions(locations, (source_size(width, factor), source_size(height, factor)), level)
        return resample_to(batch, (height, width))

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """Whole slide as numpy (h, w, 3) uint8 with the longer side at most ``max_size``."""
        level = self._thumbnail_level(max_size)
        width, height = self.level_dimensions[level]
        try:
            whole = self._read([(0, 0)], (width, height), level, "cpu")
        except SlideError:
            raise
        except Exception as err:
            raise SlideError(self.path, f"cannot read level {level} for a thumbnail: {err}") from err
        scale = min(1.0, max_size / max(self.dimensions))
        shape = (max(1, round(self.dimensions[1] * scale)), max(1, round(self.dimensions[0] * scale)))
        return thumbnail_resize(whole[0], shape)

    def describe(self) -> dict:
        """JSON-able summary: what `nic info` prints."""
        return {
            "path": str(self.path),
            "slide_id": self.slide_id,
            "format": self.format,
            "reader": self.reader,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "levels": [
                {"level": lvl, "width": w, "height": h, "downsample": round(ds, 6)}
                for lvl, ((w, h), ds) in enumerate(zip(self.level_dimensions, self.level_downsamples))
            ],
            "mpp": self.mpp,
        }

    @property
    def decoder(self) -> str:
        """What decoded this slide's reads: the backend's decoder, or ``libjpeg-turbo-tiles`` once
        a read was decoded from the JPEG tiles themselves."""
        return "libjpeg-turbo-tiles" if self._tile_reads else self._backend_decoder

    def _read(self, locations, size, level: int, device: str):
        """The region decoded strictly from its JPEG tiles where that can give the backend's
        pixels (one region to the CPU); else the backend's read after the tile check. CorruptTile
        when a tile under it is corrupt."""
        if self._jpeg_tiles is not None:
            if device == "cpu" and len(locations) == 1:
                region = self._jpeg_tiles.read(locations[0], size, level)
                if region is not None:
                    self._tile_reads += 1
                    return region
            self._jpeg_tiles.check(locations, size, level)
        return self._backend.read_many(locations, size, level, device)

    def _check_level(self, level: int):
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level {level} does not exist (the slide has {self.level_count})")

    def _thumbnail_level(self, max_size: int) -> int:
        """The coarsest level still at least ``max_size`` px on its longer side."""
        big_enough = [lvl for lvl, dims in enumerate(self.level_dimensions) if max(dims) >= max_size]
        return max(big_enough, default=0)


# ---------------------------------------------------------------------------- resampling


def resample(batch, size_px: int):
    """Square batch (n, s, s, 3) uint8 -> (n, size_px, size_px, 3): area mean, numpy or cupy."""
    return resample_to(batch, (size_px, size_px))


def resample_to(batch, shape: tuple[int, int]):
    """Resize a (n, h, w, 3) uint8 batch to ``shape`` (h, w); block mean when the factor is an integer."""
    n, height, width, channels = batch.shape
    out_h, out_w = shape
    if (height, width) == (out_h, out_w):
        return batch
    xp = array_namespace(batch)
    if height % out_h == 0 and width % out_w == 0 and height // out_h == width // out_w:
        k = height // out_h
        out = batch.reshape(n, out_h, k, out_w, k, channels).mean(axis=(2, 4))
    else:
        transform = skimage(xp, "transform")
        out = transform.resize(
            batch.astype(xp.float32), (n, out_h, out_w, channels), order=1, anti_aliasing=True, preserve_range=True
        )
    return xp.clip(xp.rint(out), 0, 255).astype(xp.uint8)


def thumbnail_resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (h, w, 3) uint8 image on the CPU resized to ``shape`` (h, w) with Pillow's anti-aliased
    bilinear filter: within ~0.6 grey levels of skimage's anti-aliased resize (the general path of
    :func:`resample_to`) and ~100x faster on a whole level (3.5 s -> 0.2 s, 3072 -> 2048 px)."""
    from PIL import Image

    if image.shape[:2] == tuple(shape):
        return image
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def source_size(size_px: int, factor: float) -> int:
    """Pixels to read at the source level to cover ``size_px`` at ``factor`` times coarser."""
    nearest = round(factor)
    if nearest >= 1 and abs(factor - nearest) <= SCALE_TOLERANCE * factor:
        return size_px * nearest
    return max(1, round(size_px * factor))


def device_namespace(device: str):
    """numpy for "cpu", cupy for "cuda" (imported only then: CuPy is optional)."""
    if device == "cuda":
        import cupy

        return cupy
    return np


def empty_batch(size, device: str):
    """A (0, h, w, 3) uint8 batch on ``device``."""
    xp = device_namespace(device)
    return xp.zeros((0, size[1], size[0], 3), dtype=xp.uint8)
