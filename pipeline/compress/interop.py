"""Compressed cohorts to and from the MIL world's HDF5 feature files (CLAM, TRIDENT).

CLAM and TRIDENT keep one ``<slide>.h5`` per slide: ``features`` (N, C) and ``coords`` (N, 2),
the level-0 pixel (x, y) of each patch's top-left corner. TRIDENT keeps the patching settings as
attributes of ``coords`` in the feature file (``patch_size``, ``patch_size_level0``,
``level0_magnification``, ``target_magnification``, ``overlap``, ``level0_width``,
``level0_height``) and the encoder's name on ``features``; CLAM keeps them (``patch_size``,
``patch_level``, ``downsample``, ``level_dim``) only in its patching output, ``patches/<slide>.h5``.

:func:`export_h5` writes CLAM's feature layout (``h5_files/<slide>.h5`` with both sets of
attributes, ``pt_files/<slide>.pt``) and lists the slides it leaves out. :func:`import_h5` places
such bags back on a grid store, where NIC's slide models (and ``nic view``) read them. It never
moves two patches onto one cell: a bag whose patches do not fit one lattice is refused, and the
lattice's origin (CLAM starts it at a tissue piece's bounding box, not at 0) is kept in the slide's
``lattice_origin_px`` attribute and its µm coordinates.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from nic_pipeline.compress.catalog import describe_store, index_entry
from nic_pipeline.compress.grid import DEFAULT_BLOCK, Grid
from nic_pipeline.compress.index import IndexWriter
from nic_pipeline.compress.store import (
    COMPLETE,
    CompressionConfig,
    create_slide,
    open_cohort,
    open_store,
    source_fingerprint,
)
from nic_pipeline.errors import NicError

LEFT_OUT = "left_out.csv"
"""The export's list of slides it did not write, with the reason (slide_id,status,reason)."""
ORIGIN = "lattice_origin_px"
"""Slide attribute: level-0 (x, y) px of cell (0, 0)'s top-left corner (absent: (0, 0))."""
SLIDE_SIZE = "slide_size_px"
"""Slide attribute of imported slides: level-0 (width, height) px the grid covers."""


def _magnification(mpp: float) -> float:
    """Objective magnification of a µm/px by the usual convention (1.0 = 10x, 0.5 = 20x, 0.25 = 40x);
    the same formula turns a magnification back into µm/px."""
    return round(10.0 / mpp, 2)


# ---------------------------------------------------------------- export


def export_h5(store: str | os.PathLike, out_dir: str | os.PathLike, slide_ids=None) -> list[Path]:
    """CLAM's feature layout for the complete slides of a store: ``h5_files/<slide>.h5`` (features,
    coords and the CLAM and TRIDENT attributes) and ``pt_files/<slide>.pt`` (the features tensor,
    as CLAM's extract_features_fp.py saves it); the slides left out go to ``left_out.csv``.
    Returns the h5 files written."""
    root, out_dir = open_cohort(store), Path(out_dir)
    left_out = left_out_slides(store, slide_ids)
    wanted = slide_ids or [row["slide_id"] for row in describe_store(store)]
    for sub in ("h5_files", "pt_files"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    written = [_export_slide(root[s], s, out_dir) for s in wanted if s not in left_out]
    _write_left_out(out_dir / LEFT_OUT, left_out)
    return written


def left_out_slides(store: str | os.PathLike, slide_ids=None) -> dict[str, str]:
    """Slides an export cannot write, with the reason: not complete (failed, interrupted), no
    encoded cell, or not in the store at all."""
    rows = {row["slide_id"]: row for row in describe_store(store)}
    reasons = {}
    for slide_id in slide_ids or sorted(rows):
        row = rows.get(slide_id)
        if row is None:
            reasons[slide_id] = "missing: not in the store"
        elif row["status"] != COMPLETE:
            why = row["error"] or "the run that made it did not finish; rerun nic compress"
            reasons[slide_id] = f"{row['status']}: {why}"
        elif not row["tissue_cells"]:
            reasons[slide_id] = "empty: no encoded cell"
    return reasons


def _write_left_out(path: Path, reasons: dict[str, str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "status", "reason"])
        for slide_id, reason in reasons.items():
            status, _, why = reason.partition(": ")
            writer.writerow([slide_id, status, why])


def _export_slide(group, slide_id: str, out_dir: Path) -> Path:
    """One slide's h5 and pt files; returns the h5 path."""
    attrs = dict(group.attrs)
    grid = Grid(0, 0, attrs["slide_mpp"], attrs["mpp"], attrs["patch_size"], attrs["stride"])  # for its geometry
    rows, cols = np.nonzero(group["tissue"][...] >= attrs["min_tissue"])
    features = np.ascontiguousarray(group["features"][...][:, rows, cols].T.astype(np.float32))
    x, y = grid.cell_origin_px(rows, cols)
    origin = attrs.get(ORIGIN, [0, 0])
    coords = np.stack([x + origin[0], y + origin[1]], axis=1).astype(np.int64)
    path = out_dir / "h5_files" / f"{slide_id}.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features)
        handle.create_dataset("coords", data=coords).attrs.update(_coords_attrs(attrs, grid, slide_id))
        handle["features"].attrs.update({"encoder": attrs["encoder"], "encoder_sha256": attrs["encoder_sha256"],
                                         "name": slide_id})
    torch.save(torch.from_numpy(features), out_dir / "pt_files" / f"{slide_id}.pt")
    return path


def _coords_attrs(attrs: dict, grid: Grid, slide_id: str) -> dict:
    """CLAM's and TRIDENT's patching attributes of one slide (``patch_size`` at the encoder's µm/px,
    as TRIDENT means it). The slide size is the one recorded at import, else the extent of the grid."""
    ny, nx = attrs["grid_shape"]
    origin = attrs.get(ORIGIN, [0, 0])
    extent = [int(np.ceil(o + ((n - 1) * grid.stride + grid.patch_size) * grid.scale)) for o, n in zip(origin, (nx, ny))]
    width, height = attrs.get(SLIDE_SIZE, extent)
    return {
        "patch_size": attrs["patch_size"], "patch_level": 0, "downsample": [grid.scale, grid.scale],
        "patch_size_level0": int(round(attrs["patch_size"] * grid.scale)),
        "level0_magnification": _magnification(attrs["slide_mpp"]), "target_magnification": _magnification(attrs["mpp"]),
        "overlap": attrs["patch_size"] - attrs["stride"], "name": slide_id, "level0_width": int(width),
        "level0_height": int(height), "level_dim": [int(width), int(height)],
        "level0_mpp": attrs["slide_mpp"], "mpp": attrs["mpp"],
    }


# ---------------------------------------------------------------- import


@dataclass
class Bag:
    """One feature file as read: features (N, C), level-0 coords (N, 2), the patching attributes
    (the feature file's, completed from a CLAM/TRIDENT patches file) and the features' own."""

    path: Path
    features: np.ndarray
    coords: np.ndarray
    attrs: dict
    feature_attrs: dict
    patches_path: Path | None = None

    @property
    def slide_id(self) -> str:
        return self.path.stem


@dataclass
class Placement:
    """Where a bag's patches go: the grid (from the lattice's origin), each patch's cell, and the
    attributes that say where the numbers came from."""

    grid: Grid
    rows: np.ndarray
    cols: np.ndarray
    attrs: dict = field(default_factory=dict)


@dataclass
class ImportReport:
    """Slide ids imported, and the files refused with their reason."""

    imported: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def h5_inputs(paths) -> list[Path]:
    """The feature files named: files as they are, folders as the ``*.h5`` inside them (a CLAM
    export's ``h5_files/`` when the folder holds one). Refuses a folder without any, and two files
    with one slide id."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            folder = path / "h5_files" if (path / "h5_files").is_dir() else path
            files = sorted(folder.glob("*.h5"))
            if not files:
                raise NicError(f"{path}: no .h5 feature files in this folder")
            found += files
        else:
            found.append(path)
    seen: dict[str, Path] = {}
    for path in found:
        if path.stem in seen and seen[path.stem].resolve() != path.resolve():
            raise NicError(f"{path} and {seen[path.stem]} would both be slide {path.stem!r}: import them into two stores")
        seen[path.stem] = path
    return list(dict.fromkeys(found))


def patches_file(h5: Path, patches_dir: Path | None = None) -> Path | None:
    """The CLAM (``patches/<slide>.h5``) or TRIDENT (``patches/<slide>_patches.h5``) patching
    file of a feature file: in ``patches_dir``, or a ``patches/`` folder beside the feature folder
    or above it (CLAM's ``h5_files/``, TRIDENT's ``features_<encoder>/``)."""
    folders = [patches_dir] if patches_dir else [h5.parent / "patches", h5.parent.parent / "patches"]
    for folder in folders:
        for name in (f"{h5.stem}.h5", f"{h5.stem}_patches.h5"):
            if (Path(folder) / name).is_file():
                return Path(folder) / name
    return None


def read_bag(path: Path, patches_dir: Path | None = None) -> Bag:
    """A feature file's arrays and attributes; patching attributes it lacks come from its patches
    file when there is one."""
    try:
        with h5py.File(path, "r") as handle:
            missing = [name for name in ("features", "coords") if name not in handle]
            if missing:
                raise NicError(f"{path}: not a CLAM/TRIDENT feature file (no {' or '.join(missing)} dataset)")
            features, coords = handle["features"][...], handle["coords"][...]
            attrs, feature_attrs = dict(handle["coords"].attrs), dict(handle["features"].attrs)
    except OSError as err:
        raise NicError(f"{path}: not readable as HDF5 ({err})") from err
    features = features.reshape(-1, features.shape[-1]) if features.ndim > 1 else features.reshape(len(coords), -1)
    if len(features) != len(coords) or not len(coords):
        raise NicError(f"{path}: {len(features)} feature rows for {len(coords)} coords; nothing to place")
    found = patches_file(path, patches_dir)
    if found is not None:
        with h5py.File(found, "r") as handle:
            attrs = {**dict(handle["coords"].attrs), **attrs}
    return Bag(path, features, coords.astype(np.int64), attrs, feature_attrs, found)


def bag_encoder(bag: Bag, flag: str | None) -> str:
    """The encoder recorded on the features (our export, TRIDENT), else ``--encoder``; the two
    must agree when both are there."""
    recorded = str(bag.feature_attrs.get("encoder", "")).strip()
    recorded = "" if recorded in ("None", "none") else recorded
    if recorded and flag and flag != recorded:
        raise NicError(f"{bag.path}: the file says encoder {recorded!r}, --encoder says {flag!r}")
    if not (recorded or flag):
        raise NicError(f"{bag.path}: the file does not record its encoder; pass --encoder NAME")
    return recorded or flag


def _patch_geometry(bag: Bag, patch_size0: int | None) -> tuple[int, float, int]:
    """(patch side at the features' µm/px, the same in level-0 px, stride at the features' µm/px)."""
    attrs = bag.attrs
    downsample = float(np.atleast_1d(attrs.get("downsample", [1.0]))[0])
    patch = int(attrs.get("patch_size", 0))
    patch0 = float(attrs.get("patch_size_level0") or patch * downsample or patch_size0 or 0)
    if not patch0:
        where = f"nor in {bag.patches_path}" if bag.patches_path else "and no patches/ file lies beside it"
        raise NicError(f"{bag.path}: no patch size in the file {where}; pass --patch-size "
                       "(level-0 px) or --patches DIR")
    patch = patch or int(round(patch0))
    return patch, patch0, patch - int(attrs.get("overlap", 0))


def _slide_mpp(bag: Bag, mpp: float | None, slide: dict | None) -> tuple[float, str]:
    """Level-0 µm/px and where it came from: --mpp, the file, the slide, the file's magnification."""
    magnification = float(bag.attrs.get("level0_magnification", -1) or -1)
    for value, source in ((mpp, "given"), (bag.attrs.get("level0_mpp"), "h5"), ((slide or {}).get("mpp"), "slide"),
                          (_magnification(magnification) if magnification > 0 else None, "h5-magnification")):
        if value:
            return float(value), source
    raise NicError(f"{bag.path}: no µm/px in the file; pass --mpp or --slides")


def _slide_size(bag: Bag, slide: dict | None, downsample: float) -> tuple[tuple[int, int] | None, str]:
    """Level-0 (width, height) px of the slide: the slide given, the file's TRIDENT attributes,
    CLAM's ``level_dim`` times ``downsample``; None when nothing says it."""
    attrs = bag.attrs
    if slide:
        return (int(slide["width"]), int(slide["height"])), "slide"
    if attrs.get("level0_width") and attrs.get("level0_height"):
        return (int(attrs["level0_width"]), int(attrs["level0_height"])), "h5"
    if attrs.get("level_dim") is not None:
        width, height = np.atleast_1d(attrs["level_dim"])[:2]
        return (int(round(width * downsample)), int(round(height * downsample))), "h5-level-dim"
    return None, "patches"


def lattice(coords: np.ndarray, step0: float, snap: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """(origin (x, y) in [0, step0), each patch's (col, row), largest move in px) of patches on a
    lattice of ``step0`` level-0 px. The origin is the one most patches share; patches off it (by
    more than the 1 px of rounding) are refused unless ``snap``, and two patches on one cell always."""
    phase = np.round(np.mod(coords + 1.0, step0) - 1.0).astype(np.int64)
    values, counts = np.unique(phase, axis=0, return_counts=True)
    origin = np.clip(values[np.argmax(counts)], 0, None)
    cells = np.round((coords - origin) / step0).astype(np.int64)
    moved = np.abs(coords - origin - cells * step0).max(axis=1)
    off = int((moved > 1.0).sum())
    if off and not snap:
        raise NicError(f"{off} of {len(coords)} patches lie off the lattice of the others (step {step0:g} px from "
                       f"origin {tuple(origin.tolist())}), as CLAM's patches of separate tissue pieces do; "
                       "pass --snap to move each to its nearest cell")
    if len(np.unique(cells, axis=0)) < len(cells):
        raise NicError(f"{len(cells) - len(np.unique(cells, axis=0))} patches fall on a cell that another patch "
                       f"holds (step {step0:g} px): refusing to merge them")
    return origin, cells, float(moved.max())


def place(bag: Bag, mpp: float | None = None, patch_size0: int | None = None, slide: dict | None = None,
          snap: bool = False) -> Placement:
    """The grid a bag's patches lie on, starting at their lattice's origin and covering the slide,
    and each patch's cell. ``slide``: {"width", "height", "mpp"} of the slide, when given."""
    patch, patch0, stride = _patch_geometry(bag, patch_size0)
    slide_mpp, mpp_source = _slide_mpp(bag, mpp, slide)
    step0 = patch0 * stride / patch
    try:
        origin, cells, moved = lattice(bag.coords, step0, snap)
    except NicError as err:
        raise NicError(f"{bag.path}: {err}") from None
    downsample = float(np.atleast_1d(bag.attrs.get("downsample", [1.0]))[0])
    size, size_source = _slide_size(bag, slide, downsample)
    if size is None:  # nothing records the slide: the grid ends at the last patch (or its cell)
        last = np.maximum(bag.coords.max(axis=0), origin + cells.max(axis=0) * step0)
        size = tuple(int(np.ceil(v)) for v in last + patch0)
    grid = Grid(size[0] - int(origin[0]), size[1] - int(origin[1]), slide_mpp, slide_mpp * patch0 / patch, patch, stride)
    cols, rows = cells.T
    outside = int(((rows < 0) | (cols < 0) | (rows >= grid.shape[0]) | (cols >= grid.shape[1])).sum())
    if outside:
        raise NicError(f"{bag.path}: {outside} patches lie outside the slide's {size[0]} x {size[1]} px "
                       f"({size_source}); is it the right slide?")
    attrs = {ORIGIN: [int(v) for v in origin], SLIDE_SIZE: list(size), "slide_size_source": size_source,
             "mpp_source": mpp_source}
    if moved > 1.0:
        attrs["snapped_px"] = round(moved, 2)
    return Placement(grid, rows, cols, attrs)


def slides_by_id(paths) -> dict[str, dict]:
    """Size and µm/px of the slides given with ``--slides`` (files or folders), by slide id."""
    from nic_pipeline.io import find_slides, open_slide, slide_id_of

    found = {}
    for path in find_slides(paths):
        with open_slide(path, check_tiles=False) as slide:
            found[slide_id_of(path)] = {"width": slide.dimensions[0], "height": slide.dimensions[1], "mpp": slide.mpp}
    return found


def import_h5(paths, store: str | os.PathLike, encoder: str | None = None, mpp: float | None = None,
              patch_size: int | None = None, patches_dir=None, slides=None, snap: bool = False,
              block: int = DEFAULT_BLOCK) -> ImportReport:
    """Place the bags of CLAM/TRIDENT ``.h5`` files (or folders of them) on a grid store, one group
    per file. Cells with a patch get its code and tissue 1; the rest stay empty. A file that does
    not fit is refused with its reason and the others are imported."""
    report, known = ImportReport(), slides_by_id(slides) if slides else {}
    index = IndexWriter(store, "import-h5")
    for path in h5_inputs(paths):
        try:
            bag = read_bag(path, Path(patches_dir) if patches_dir else None)
            name = bag_encoder(bag, encoder)
            placement = place(bag, mpp, patch_size, known.get(bag.slide_id), snap)
            _write_slide(store, bag, placement, name, block)
        except NicError as err:
            report.refused[str(path)] = str(err).removeprefix(f"{path}: ")
            continue
        report.imported.append(bag.slide_id)
        index.add(index_entry(str(store), bag.slide_id))
    index.close()
    return report


def _write_slide(store, bag: Bag, placement: Placement, encoder: str, block: int) -> None:
    """One slide's group: codes on their cells, tissue 1 there, µm coordinates from the origin."""
    grid, rows, cols = placement.grid, placement.rows, placement.cols
    config = CompressionConfig(encoder=encoder, encoder_sha256=str(bag.feature_attrs.get("encoder_sha256", "imported")),
                               code_dim=int(bag.features.shape[1]), mpp=grid.mpp, patch_size=grid.patch_size,
                               stride=grid.stride, block=block, min_tissue=0.5, mask_mpp=0.0, precision="imported")
    root = open_store(store, config)
    tissue = np.zeros(grid.shape, np.float32)
    tissue[rows, cols] = 1.0
    group = create_slide(root, bag.slide_id, grid, config, tissue, {**source_fingerprint(bag.path), **placement.attrs})
    codes = np.zeros((config.code_dim, *grid.shape), np.float16)
    codes[:, rows, cols] = bag.features.T
    group["features"][...] = codes
    y_um, x_um = grid.coords_um()
    origin = placement.attrs[ORIGIN]
    group["x"][...] = x_um + origin[0] * grid.slide_mpp
    group["y"][...] = y_um + origin[1] * grid.slide_mpp
    group.attrs["status"] = COMPLETE
