"""Slide files: which names are slides, finding them, and checking a file before a C reader
touches it (empty, not a TIFF, truncated, implausible, a DICOM that is no whole-slide image), so
that bad input gives one :class:`~pipeline.errors.SlideError` naming the file and the reason."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

import pydicom

from pipeline.errors import SlideError
from pipeline.io.tiff import check_tiff

SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".dcm", ".vms", ".vmu", ".bif", ".svslide"}
)
TIFF_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"})
DICOM_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def slide_id_of(path: str | os.PathLike) -> str:
    """The slide id: the file name without its extension."""
    return Path(path).stem


def find_slides(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Slide files among ``paths`` (files, or directories searched recursively), sorted, unique."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise SlideError(path, "no such file or directory")
        if path.is_dir():
            found.update(p.resolve() for p in path.rglob("*") if p.is_file() and is_slide_name(p))
        elif is_slide_name(path):
            found.add(path.resolve())
        else:
            raise SlideError(path, f"unsupported extension {path.suffix!r} ({supported()})")
    return sorted(found)


def supported() -> str:
    return "supported: " + " ".join(sorted(SUFFIXES))


def is_slide_name(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def check_file(path: Path) -> Path:
    """The path if it is a non-empty file with a slide extension, else a SlideError saying which."""
    if not path.exists():
        raise SlideError(path, "no such file")
    if not path.is_file():
        raise SlideError(path, "not a file")
    if not is_slide_name(path):
        raise SlideError(path, f"unsupported extension {path.suffix!r} ({supported()})")
    if path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")
    if path.suffix.lower() in TIFF_SUFFIXES:
        check_tiff(path)
    return path


def why_unreadable(path: Path, errors: dict[str, str]) -> str:
    """A one-line reason why no reader opened ``path``, from each reader's own message."""
    tried = "; ".join(f"{name}: {message}" for name, message in errors.items())
    if path.suffix.lower() == ".dcm":
        problem = dicom_problem(path)
        if problem:
            return f"{problem} ({tried})"
    return f"no reader can open it ({tried})"


def dicom_problem(path: Path) -> str | None:
    """What makes a DICOM file unusable as a whole-slide image, or None when nothing obvious."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:
            return f"not a DICOM file ({err})"
    if ds.get("SOPClassUID") != DICOM_WSI_SOP_CLASS:
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
