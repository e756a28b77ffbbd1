"""µm/px rules: which metadata field gives a slide's µm/px, which values are believable, and the
per-slide override CSV. See docs/slides.md (µm/px)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from nic_pipeline.errors import NicError

MPP_FIX = "pass --mpp X (µm/px of level 0) or --mpp-csv FILE with columns slide_id,mpp"
PLAUSIBLE_MPP = (0.01, 100.0)  # µm/px; outside this a resolution tag is not a microscope's


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
            table[row["slide_id"].strip()] = valid_mpp(row["mpp"])
        except (AttributeError, NicError):
            raise NicError(f"{path}: line {line}: need a slide_id and a positive mpp, got {row}") from None
    return table


def cucim_mpp(metadata: dict) -> float | None:
    """µm/px from cuCIM's metadata: Aperio ``MPP``, Philips pixel spacing (mm), else TIFF
    resolution tags with a unit."""
    aperio = metadata.get("aperio") or {}
    if "MPP" in aperio:
        return plausible_mpp(aperio["MPP"])
    philips_spacing = (metadata.get("philips") or {}).get("DICOM_PIXEL_SPACING")
    if philips_spacing:
        return philips_mpp(philips_spacing)
    tiff = metadata.get("tiff") or {}
    return tiff_resolution_mpp(tiff.get("x_resolution"), tiff.get("resolution_unit"))


def philips_mpp(spacing) -> float | None:
    """µm/px from Philips DICOM_PIXEL_SPACING (mm, as a list or a '"a" "b"' string), as OpenSlide does."""
    first = spacing[0] if isinstance(spacing, (list, tuple)) else str(spacing).split()[0]
    try:
        return plausible_mpp(float(str(first).strip('"')) * 1000)
    except ValueError:
        return None


def tiff_resolution_mpp(x_resolution, unit) -> float | None:
    """µm/px from XResolution (px per unit); None without a real unit (cuCIM's 1.0 default)."""
    um_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(str(unit or "").lower())
    if um_per_unit is None or not x_resolution or float(x_resolution) <= 1:
        return None
    return plausible_mpp(um_per_unit / float(x_resolution))


TIFF_UNITS = {2: ("inch", 25400.0), 3: ("centimeter", 1e4)}  # ResolutionUnit tag values


def missing_mpp(path: str | os.PathLike) -> str:
    """Why a slide has no µm/px, for its FAILED line: "no µm/px in its metadata", or, for a TIFF
    whose resolution tags give one no microscope scans at (1 px/cm: 10,000 µm/px), what they say."""
    import tifffile  # only on this error path

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            unit, resolution = tags.get("ResolutionUnit"), tags.get("XResolution")
            unit = TIFF_UNITS.get(int(unit.value)) if unit is not None else None
            px_per_unit = resolution.value[0] / resolution.value[1] if resolution is not None and resolution.value[1] else 0
    except Exception:  # noqa: BLE001 - not a TIFF, or no tags: nothing more to say
        unit, px_per_unit = None, 0
    if unit is None or px_per_unit <= 0:
        return "no µm/px in its metadata"
    name, um_per_unit = unit
    return (f"its TIFF resolution tags say {px_per_unit:g} px per {name} ({um_per_unit / px_per_unit:g} µm/px), "
            f"not a microscope's ({PLAUSIBLE_MPP[0]:g} to {PLAUSIBLE_MPP[1]:g} µm/px), so no µm/px is known")


def plausible_mpp(value) -> float | None:
    """A metadata µm/px as float, or None when absent or not a microscope's value."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def valid_mpp(value) -> float:
    """A user-given µm/px as a positive float, else a NicError."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        mpp = math.nan
    if not (math.isfinite(mpp) and mpp > 0):
        raise NicError(f"µm/px must be a positive number, got {value!r}")
    return mpp
