"""Whole-slide readers behind one interface: cuCIM first, OpenSlide for the rest.

cuCIM (``cucim.CuImage``) reads generic tiled TIFF, Aperio SVS and Philips TIFF, on CPU
or straight to GPU memory (``device="cuda"``), and batches many regions in one call.
OpenSlide reads everything else (NDPI, MRXS, SCN, DICOM, ...) and is the fallback when
cuCIM cannot open a file it should support. Both sit behind :class:`Slide`, which adds
µm/px handling (metadata, override, clear failure) and reading at a target µm/px.
Corrupt input is caught before it reaches the C readers and reported as one
:class:`~pipeline.errors.SlideError` naming the file and the reason. See docs/slides.md.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.runtime.arrays import array_namespace, skimage
from pipeline.errors import NicError, SlideError

SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".dcm", ".vms", ".vmu", ".bif", ".svslide"}
)
CUCIM_SUFFIXES = frozenset({".svs", ".tif", ".tiff"})
TIFF_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"})
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
READERS = ("auto", "cucim", "openslide")
DEVICES = ("cpu", "cuda")
MPP_FIX = "pass --mpp X (µm/px of level 0) or --mpp-csv FILE with columns slide_id,mpp"
PLAUSIBLE_MPP = (0.01, 100.0)  # µm/px; outside this a resolution tag is not a microscope's
LEVEL_TOLERANCE = 0.01  # a level up to 1 % coarser than the target still counts as "not coarser"
BATCH_SIZE = 32  # regions per cuCIM batch


# ---------------------------------------------------------------------------- public helpers


def find_slides(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Slide files among ``paths`` (files, or directories searched recursively), sorted, unique."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise SlideError(path, "no such file or directory")
        if path.is_dir():
            found.update(p.resolve() for p in path.rglob("*") if p.is_file() and _is_slide_name(p))
        elif _is_slide_name(path):
            found.add(path.resolve())
        else:
            raise SlideError(path, f"unsupported extension {path.suffix!r} ({_supported()})")
    return sorted(found)


def read_mpp_csv(path: str | os.PathLike) -> dict[str, float]:
    """Per-slide µm/px overrides from a CSV with columns ``slide_id,mpp``."""
    path = Path(path)
    if not path.is_file():
        raise NicError(f"{path}: mpp CSV not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"slide_id", "mpp"} <= set(rows[0]):
        raise NicError(f"{path}: mpp CSV needs columns slide_id,mpp (found {','.join(rows[0])})")
    table = {}
    for line, row in enumerate(rows, start=2):
        try:
            table[row["slide_id"].strip()] = _valid_mpp(row["mpp"])
        except (AttributeError, NicError):
            raise NicError(f"{path}: line {line}: need a slide_id and a positive mpp, got {row}") from None
    return table


def open_slide(
    path: str | os.PathLike, mpp: float | None = None, reader: str = "auto", device: str = "cpu"
) -> "Slide":
    """Open a slide with cuCIM where it can, else OpenSlide; ``mpp`` overrides the metadata."""
    if reader not in READERS:
        raise NicError(f"unknown reader {reader!r} (choose from {', '.join(READERS)})")
    if device not in DEVICES:
        raise NicError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if device == "cuda" and not has_gpu():
        raise NicError("device='cuda' was asked for but no CUDA GPU is available")
    path = _check_file(Path(path))
    if mpp is not None:
        mpp = _valid_mpp(mpp)
    backend = _open_backend(path, reader)
    return Slide(path, backend, mpp_override=mpp, device=device)


def has_gpu() -> bool:
    """True when CuPy can see a CUDA device (checked at run time, never at import)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# ---------------------------------------------------------------------------- the Slide


class Slide:
    """An open whole-slide image: pyramid geometry, µm/px, region reads (numpy, or cupy on GPU)."""

    def __init__(self, path: Path, backend, mpp_override: float | None = None, device: str = "cpu"):
        self.path = path
        self.slide_id = slide_id_of(path)
        self.device = device
        self._backend = backend
        self.reader = backend.name
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
        """Release the reader's file handle."""
        self._backend.close()

    def require_mpp(self) -> float:
        """The slide's µm/px, or a SlideError saying how to supply it."""
        if self.mpp is None:
            raise SlideError(self.path, f"µm/px unknown (not in the slide's metadata): {MPP_FIX}")
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
            return _empty_batch(size, self.device)
        try:
            return self._backend.read_many(locations, size, level, self.device)
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
        target = _valid_mpp(target_mpp) * (1 + LEVEL_TOLERANCE)
        fine_enough = [lvl for lvl in range(self.level_count) if self.level_mpp(lvl) <= target]
        return max(fine_enough, key=lambda lvl: self.level_downsamples[lvl], default=0)

    def read_regions_at_mpp(self, locations: Sequence, size_px, target_mpp: float):
        """(n, h, w, 3) uint8 at ``target_mpp``; ``size_px`` is a side or (w, h) at the target,
        ``locations`` are level-0 px (top-left)."""
        width, height = (size_px, size_px) if np.isscalar(size_px) else size_px
        level = self.level_for_mpp(target_mpp)
        factor = target_mpp / self.level_mpp(level)
        batch = self.read_regions(locations, (_source_size(width, factor), _source_size(height, factor)), level)
        return resample_to(batch, (height, width))

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """Whole slide as numpy (h, w, 3) uint8 with the longer side at most ``max_size``."""
        level = self._thumbnail_level(max_size)
        width, height = self.level_dimensions[level]
        try:
            whole = self._backend.read_many([(0, 0)], (width, height), level, "cpu")
        except Exception as err:
            raise SlideError(self.path, f"cannot read level {level} for a thumbnail: {err}") from err
        scale = min(1.0, max_size / max(self.dimensions))
        shape = (max(1, round(self.dimensions[1] * scale)), max(1, round(self.dimensions[0] * scale)))
        return resample_to(whole, shape)[0]

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

    def _check_level(self, level: int):
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level {level} does not exist (the slide has {self.level_count})")

    def _thumbnail_level(self, max_size: int) -> int:
        """The coarsest level still at least ``max_size`` px on its longer side."""
        big_enough = [lvl for lvl, dims in enumerate(self.level_dimensions) if max(dims) >= max_size]
        return max(big_enough, default=0)


def slide_id_of(path: str | os.PathLike) -> str:
    """The slide id: the file name without its extension."""
    return Path(path).stem


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


SCALE_TOLERANCE = 0.02
"""Scale factors within 2% of an integer are taken as that integer: a 0.499 µm/px scan read at
0.5 µm/px is not resampled (that is within scanner calibration error, and resampling costs more
than decoding)."""


def _source_size(size_px: int, factor: float) -> int:
    """Pixels to read at the source level to cover ``size_px`` at ``factor`` times coarser."""
    nearest = round(factor)
    if nearest >= 1 and abs(factor - nearest) <= SCALE_TOLERANCE * factor:
        return size_px * nearest
    return max(1, round(size_px * factor))


def _empty_batch(size, device):
    xp = _device_namespace(device)
    return xp.zeros((0, size[1], size[0], 3), dtype=xp.uint8)


def _device_namespace(device: str):
    if device == "cuda":
        import cupy

        return cupy
    return np


# ---------------------------------------------------------------------------- readers


class _CucimReader:
    """cuCIM: generic tiled TIFF, Aperio SVS, Philips TIFF; CPU or GPU decode, batched reads."""

    name = "cucim"

    def __init__(self, path: Path):
        from cucim import CuImage

        self._image = CuImage(str(path))
        self._metadata = self._image.metadata
        resolutions = self._image.resolutions
        self.level_dimensions = resolutions["level_dimensions"]
        self.level_downsamples = resolutions["level_downsamples"]
        self.format, self.vendor = _cucim_format(self._metadata)
        self._probe()

    def _probe(self):
        """Decode one pixel: cuCIM opens some TIFFs (zstd, packbits) it then cannot decode."""
        np.asarray(self._image.read_region((0, 0), (1, 1), len(self.level_dimensions) - 1))

    def metadata_mpp(self) -> float | None:
        return _cucim_mpp(self._metadata)

    def read_many(self, locations, size, level, device):
        xp = _device_namespace(device)
        if len(locations) == 1:
            return _copy_rgb(self._image.read_region(locations[0], size, level, device=device), xp)
        batches = self._image.read_region(
            locations,
            size,
            level,
            device=device,
            num_workers=min(len(locations), os.cpu_count() or 1),
            batch_size=min(len(locations), BATCH_SIZE),
        )
        return xp.concatenate([_copy_rgb(batch, xp) for batch in batches])

    def close(self):
        self._image.close()


def _copy_rgb(region, xp):
    """(n, h, w, 3) copy of a cuCIM result: batch buffers are recycled by the loader, so never keep a view."""
    array = xp.array(region, copy=True)
    return array.reshape(-1, *array.shape[-3:])[..., :3]


class _OpenSlideReader:
    """OpenSlide: NDPI, MRXS, SCN, DICOM and the rest; CPU decode, one region at a time."""

    name = "openslide"

    def __init__(self, path: Path):
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        self._properties = dict(self._slide.properties)
        self.level_dimensions = self._slide.level_dimensions
        self.level_downsamples = self._slide.level_downsamples
        self.format = self._properties.get("openslide.vendor", "unknown")
        self.vendor = None if self.format == "generic-tiff" else self.format

    def metadata_mpp(self) -> float | None:
        return _plausible_mpp(self._properties.get("openslide.mpp-x"))

    def read_many(self, locations, size, level, device):
        batch = np.stack([self._read_one(location, size, level) for location in locations])
        return _device_namespace(device).asarray(batch)

    def _read_one(self, location, size, level) -> np.ndarray:
        """RGB of one region; transparent pixels (outside the scanned area) become white, like cuCIM."""
        rgba = np.asarray(self._slide.read_region(location, level, size))
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    def close(self):
        self._slide.close()


def _open_backend(path: Path, reader: str):
    """The first reader that opens ``path``; a SlideError explaining why when none does."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        _check_tiff_complete(path)
    candidates = _reader_order(path, reader)
    errors = {}
    for backend in candidates:
        try:
            return backend(path)
        except Exception as err:  # the C readers raise assorted types; we explain below
            errors[backend.name] = str(err).replace(f"Reading {path}: ", "")
    raise SlideError(path, _why_unreadable(path, errors))


def _reader_order(path: Path, reader: str) -> list:
    if reader == "cucim":
        return [_CucimReader]
    if reader == "openslide":
        return [_OpenSlideReader]
    if path.suffix.lower() in CUCIM_SUFFIXES and _cucim_available():
        return [_CucimReader, _OpenSlideReader]
    return [_OpenSlideReader]


def _cucim_available() -> bool:
    try:
        from cucim import CuImage  # noqa: F401

        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------- metadata


def _cucim_format(metadata: dict) -> tuple[str, str | None]:
    """(format, vendor) in OpenSlide's vocabulary from cuCIM's metadata sections."""
    for vendor in ("aperio", "philips"):
        if metadata.get(vendor):
            return vendor, vendor
    return "generic-tiff", None


def _cucim_mpp(metadata: dict) -> float | None:
    """µm/px: Aperio ``MPP``, Philips pixel spacing (mm), else TIFF resolution tags with a unit."""
    aperio = metadata.get("aperio") or {}
    if "MPP" in aperio:
        return _plausible_mpp(aperio["MPP"])
    philips_spacing = (metadata.get("philips") or {}).get("DICOM_PIXEL_SPACING")
    if philips_spacing:
        return _philips_mpp(philips_spacing)
    tiff = metadata.get("tiff") or {}
    return _tiff_resolution_mpp(tiff.get("x_resolution"), tiff.get("resolution_unit"))


def _philips_mpp(spacing) -> float | None:
    """µm/px from Philips DICOM_PIXEL_SPACING (mm, as a list or a '"a" "b"' string), as OpenSlide does."""
    first = spacing[0] if isinstance(spacing, (list, tuple)) else str(spacing).split()[0]
    try:
        return _plausible_mpp(float(str(first).strip('"')) * 1000)
    except ValueError:
        return None


def _tiff_resolution_mpp(x_resolution, unit) -> float | None:
    """µm/px from XResolution (px per unit); None without a real unit (cuCIM's 1.0 default)."""
    um_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(str(unit or "").lower())
    if um_per_unit is None or not x_resolution or float(x_resolution) <= 1:
        return None
    return _plausible_mpp(um_per_unit / float(x_resolution))


def _plausible_mpp(value) -> float | None:
    """A metadata µm/px as float, or None when absent or not a microscope's value."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def _valid_mpp(value) -> float:
    """A user-given µm/px as a positive float, else a NicError."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        mpp = math.nan
    if not (math.isfinite(mpp) and mpp > 0):
        raise NicError(f"µm/px must be a positive number, got {value!r}")
    return mpp


# ---------------------------------------------------------------------------- input checks


def _supported() -> str:
    return "supported: " + " ".join(sorted(SUFFIXES))


def _is_slide_name(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def _check_file(path: Path) -> Path:
    """The path if it is a non-empty file with a slide extension, else a SlideError saying which."""
    if not path.exists():
        raise SlideError(path, "no such file")
    if not path.is_file():
        raise SlideError(path, "not a file")
    if not _is_slide_name(path):
        raise SlideError(path, f"unsupported extension {path.suffix!r} ({_supported()})")
    if path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")
    return path


def _check_tiff_complete(path: Path):
    """SlideError unless ``path`` is a TIFF whose directories and image data lie inside the file."""
    import tifffile

    with path.open("rb") as handle:
        header = handle.read(4)
    if header not in TIFF_MAGIC:
        raise SlideError(path, f"not a slide: a {path.suffix} file must be a TIFF, but it starts with {header!r}")
    size = path.stat().st_size
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # its warnings would duplicate our message
    try:
        with tifffile.TiffFile(path) as tif:
            ends = [_data_end(page) for page in tif.pages]
    except Exception as err:
        raise SlideError(path, f"corrupt TIFF: {err}") from None
    finally:
        logger.setLevel(level)
    if not ends:
        raise SlideError(path, f"truncated or corrupt: no image directory within its {size} bytes")
    for index, end in enumerate(ends):
        if end > size:
            raise SlideError(path, f"truncated: image {index} needs {end} bytes but the file has {size}")


def _data_end(page) -> int:
    """Byte offset just past a TIFF page's last strip or tile."""
    return max((o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c), default=0)


def _why_unreadable(path: Path, errors: dict[str, str]) -> str:
    """A one-line reason why no reader opened ``path``."""
    tried = "; ".join(f"{name}: {message}" for name, message in errors.items())
    if path.suffix.lower() == ".dcm":
        problem = _dicom_problem(path)
        if problem:
            return f"{problem} ({tried})"
    return f"no reader can open it ({tried})"


def _dicom_problem(path: Path) -> str | None:
    """What makes a DICOM file unusable as a whole-slide image, or None when nothing obvious."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:
            return f"not a DICOM file ({err})"
    wsi_uid = "1.2.840.10008.5.1.4.1.1.77.1.6"
    if ds.get("SOPClassUID") != wsi_uid:
        return f"DICOM but not a whole-slide image (SOP class {ds.get('SOPClassUID')})"
    missing = [tag for tag in ("ImageType", "TotalPixelMatrixColumns") if tag not in ds]
    if _dicom_pixel_spacing(ds) is None:
        missing.append("PixelSpacing")
    if missing:
        return f"not a conformant DICOM whole-slide image: missing {', '.join(missing)}"
    return None


def _dicom_pixel_spacing(ds):
    """PixelSpacing from the shared functional groups, where the WSI standard puts it."""
    try:
        return ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    except (AttributeError, IndexError):
        return None
