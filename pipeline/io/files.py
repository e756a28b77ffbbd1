"""Slide files: which names are slides, finding them (a folder, a list of files, or a CSV slide
list), and checking a file before a C reader touches it (missing, unreadable, empty, not a TIFF,
truncated, implausible, a DICOM that is no whole-slide image), so that bad input gives one line
naming the file and the reason: a :class:`~nic_pipeline.errors.SlideError` when one slide is opened,
a ``(path, reason)`` problem when a cohort is discovered."""

from __future__ import annotations

import csv
import errno
import os
import warnings
from pathlib import Path
from typing import Iterable, NamedTuple, TypeVar

import pydicom

from nic_pipeline.errors import NicError, SlideError
from nic_pipeline.io.metadata import valid_mpp
from nic_pipeline.io.tiff import check_tiff

SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".dcm", ".vms", ".vmu", ".bif", ".svslide"}
)
TIFF_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"})
DICOM_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
SLIDE_LIST_COLUMNS = ("slide_id", "path")
T = TypeVar("T")


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


def discover_slides(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
) -> tuple[list[tuple[str, Path]], list[tuple[Path, str]]]:
    """``(slides, problems)``: the usable slide files among ``paths`` (files, or directories
    searched recursively) as ``(slide_id, resolved path)`` sorted by path, and every slide-named
    entry that cannot be one as ``(path, reason)``. Nothing raises: a bad file (missing, broken
    link, unreadable, empty, an id the store cannot hold, an id two files share) is a problem of
    that file, and the rest of the cohort goes on."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    candidates: set[Path] = set()
    problems: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        entries = sorted(p for p in path.rglob("*") if is_slide_name(p)) if path.is_dir() else [path]
        for entry in entries:
            problem = file_problem(entry) or slide_id_problem(slide_id_of(entry.resolve()))
            if problem:
                problems.append((entry, problem))
            else:
                candidates.add(entry.resolve())
    slides, shared = split_shared_ids([(slide_id_of(path), path, path) for path in sorted(candidates)])
    return [(slide_id_of(path), path) for path in slides], problems + shared


class SlideRow(NamedTuple):
    """One usable line of a slide list."""

    slide_id: str
    path: Path
    mpp: float | None


def read_slide_list(path: str | os.PathLike) -> tuple[list[SlideRow], list[tuple[Path, str]]]:
    """``(rows, problems)`` from a CSV slide list with a header row ``slide_id,path[,mpp]``.

    Relative paths are taken from the CSV's folder; an empty mpp means "from the metadata". A
    line whose file, id or mpp is unusable, and every line of an id given twice, is a problem
    ``(path, "line N of FILE: reason")`` instead of a row. A missing file or header is a NicError.
    """
    path = Path(path)
    if not path.is_file():
        raise NicError(f"{path}: slide list not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        records = list(csv.reader(handle))
    header = [name.strip().lower() for name in (records[0] if records else [])]
    if not set(SLIDE_LIST_COLUMNS) <= set(header):
        found = ",".join(header) or "nothing"
        raise NicError(f"{path}: a slide list needs a header row slide_id,path[,mpp] (found {found})")
    rows, problems = [], []
    for line, record in enumerate(records[1:], start=2):
        if any(cell.strip() for cell in record):
            row, problem = _slide_row(path, dict(zip(header, (cell.strip() for cell in record))))
            if problem:
                problems.append((row.path, f"line {line} of {path.name}: {problem}"))
            else:
                rows.append(row)
    unique, shared = split_shared_ids([(row.slide_id, row.path, row) for row in rows])
    return unique, problems + shared


def _slide_row(listing: Path, fields: dict[str, str]) -> tuple[SlideRow, str | None]:
    """A row from one line's fields, and what makes it unusable (None when nothing)."""
    name = Path(fields.get("path", "")).expanduser()
    file = name if name.is_absolute() else listing.parent / name
    row = SlideRow(fields.get("slide_id", ""), file, None)
    if not fields.get("path"):
        return row._replace(path=listing), "no path"
    if not row.slide_id:
        return row, "no slide_id"
    problem = slide_id_problem(row.slide_id) or file_problem(file)
    if problem:
        return row, problem
    mpp = fields.get("mpp") or None
    try:
        return row._replace(path=file.resolve(), mpp=valid_mpp(mpp) if mpp else None), None
    except NicError as err:
        return row, str(err)


def split_shared_ids(entries: list[tuple[str, Path, T]]) -> tuple[list[T], list[tuple[Path, str]]]:
    """``(unique, problems)`` from ``(slide_id, path, item)`` entries: the items whose id no other
    entry has, and a problem for each of the rest naming the others (so that ``a.svs`` and
    ``a.tif`` both fail, clearly, and the cohort goes on)."""
    paths_of: dict[str, list[Path]] = {}
    for slide_id, path, _ in entries:
        paths_of.setdefault(slide_id, []).append(path)
    unique, problems = [], []
    for slide_id, path, item in entries:
        others = [other for other in paths_of[slide_id] if other is not path]
        if not others:
            unique.append(item)
        else:
            names = ", ".join(map(str, others))
            problems.append((path, f"slide id {slide_id!r} is also the id of {names}: rename one of them"))
    return unique, problems


def supported() -> str:
    return "supported: " + " ".join(sorted(SUFFIXES))


def is_slide_name(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def slide_id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot name a slide's group in the store (Zarr v3 node names), or None."""
    if not slide_id.strip("."):
        return f"slide id {slide_id!r} is empty or only dots, which cannot name a store group: rename the file"
    if "/" in slide_id or "\\" in slide_id:
        return f"slide id {slide_id!r} contains a path separator: use another id"
    if slide_id.startswith("__"):
        return f"slide id {slide_id!r} starts with '__', which Zarr reserves: rename the file"
    if slide_id.lower() == "zarr.json":
        return f"slide id {slide_id!r} would collide with the store's own metadata file: rename the file"
    return None


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a slide file, judged from the file system alone; None when it can."""
    if path.is_symlink():
        try:
            path.stat()
        except OSError as err:
            if err.errno == errno.ELOOP:
                return f"symbolic link loop ({path.name} -> {os.readlink(path)} -> ... never reaches a file)"
            if err.errno == errno.ENOENT:
                return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
            return f"cannot follow the symbolic link to {os.readlink(path)} ({err.strerror})"
    if not path.exists():
        return "no such file or directory"
    if path.is_dir():
        return "not a file (a directory)"
    if not path.is_file():
        return "not a file (a device, pipe or socket)"
    if not is_slide_name(path):
        return f"unsupported extension {path.suffix!r} ({supported()})"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as err:
        return f"cannot read the file ({err.strerror})"
    return None


def check_file(path: Path) -> Path:
    """The path if it is a readable, non-empty slide file that can back what its header claims,
    else a SlideError saying why."""
    problem = file_problem(path)
    if problem:
        raise SlideError(path, problem)
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
