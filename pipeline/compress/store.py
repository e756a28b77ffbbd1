"""The compressed-slide store: one Zarr v3 group per slide, readable as an xarray Dataset.

Layout of ``STORE.zarr/<slide_id>``::

    features  (feature, y, x) float16, zstd, chunks (code_dim, block, block); 0 where not encoded
    tissue    (y, x)          float32 tissue fraction per cell, same chunks
    y, x, feature             coordinates: cell centres in µm, code index
    _progress/blocks          (block_y, block_x) uint8, one chunk per block: 1 once it is written

Each compression task writes the chunks of its own block and then its own progress chunk, so a
rerun knows exactly which blocks are missing; the slide's ``status`` attribute becomes
``complete`` only after every block is done. The store's root attributes hold the compression
settings; a rerun with other settings is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline import __version__
from pipeline.errors import NicError
from pipeline.compress.grid import Block, Grid, block_grid_shape

COMPLETE = "complete"
IN_PROGRESS = "in-progress"
MISSING = "missing"
_PROGRESS = "_progress/blocks"
_COMPRESSOR = ZstdCodec(level=3)


@dataclass(frozen=True)
class CompressionConfig:
    """Everything that decides the numbers in a store; two runs must agree on all of it."""

    encoder: str
    encoder_sha256: str
    code_dim: int
    mpp: float
    patch_size: int
    stride: int
    block: int = 32
    min_tissue: float = 0.1
    mask_mpp: float = 8.0
    precision: str = "fp32"
    dihedral_mean: bool = False

    def as_attrs(self) -> dict:
        return asdict(self)


def source_fingerprint(path: str | os.PathLike, sample_bytes: int = 1 << 20) -> dict:
    """Size and a sha256 over the size and the first and last MiB: cheap for 5 GB slides, yet
    any re-scan, truncation or replacement of the file changes it."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(sample_bytes))
        if size > sample_bytes:
            handle.seek(max(size - sample_bytes, sample_bytes))
            digest.update(handle.read())
    return {"source_path": str(path.resolve()), "source_size": size, "source_fingerprint": digest.hexdigest()}


def open_store(path: str | os.PathLike, config: CompressionConfig) -> zarr.Group:
    """Open or create a cohort store for writing with ``config``; refuse one made with other settings."""
    root = zarr.open_group(str(path), mode="a", zarr_format=3)
    existing = root.attrs.get("compression")
    wanted = config.as_attrs()
    if existing is None:
        root.attrs.update({"compression": wanted, "nic_version": __version__})
    elif existing != wanted:
        changed = sorted(k for k in wanted if existing.get(k) != wanted[k])
        details = ", ".join(f"{k}: store has {existing.get(k)!r}, this run {wanted[k]!r}" for k in changed)
        raise NicError(
            f"{path} was written with other compression settings ({details}); "
            "write to a new store (--out) instead of mixing them"
        )
    return root


def slide_status(root: zarr.Group, slide_id: str) -> str:
    """``missing``, ``in-progress`` or ``complete``."""
    if slide_id not in root:
        return MISSING
    return root[slide_id].attrs.get("status", IN_PROGRESS)


def create_slide(
    root: zarr.Group,
    slide_id: str,
    grid: Grid,
    config: CompressionConfig,
    tissue: np.ndarray,
    source: dict,
) -> zarr.Group:
    """Create (or reuse, when its source and grid are unchanged) the group of one slide.

    Writes the tissue fractions and coordinates; features are written block by block later.
    """
    if slide_id in root:
        group = root[slide_id]
        if group.attrs.get("source_fingerprint") == source["source_fingerprint"] and tuple(
            group.attrs.get("grid_shape", ())
        ) == grid.shape:
            return group
        raise NicError(
            f"{source['source_path']}: the store already holds a different slide named {slide_id!r} "
            "(file or grid changed); remove that group or write to a new store"
        )
    ny, nx = grid.shape
    group = root.create_group(slide_id)
    chunks = (config.block, config.block)
    group.create_array(
        "features", shape=(config.code_dim, ny, nx), chunks=(config.code_dim, *chunks), dtype="float16",
        fill_value=0, compressors=_COMPRESSOR, dimension_names=("feature", "y", "x"),
    )
    group.create_array(
        "tissue", shape=(ny, nx), chunks=chunks, dtype="float32", fill_value=0,
        compressors=_COMPRESSOR, dimension_names=("y", "x"),
    )[...] = tissue.astype(np.float32)
    y_um, x_um = grid.coords_um()
    for name, values in (("y", y_um), ("x", x_um), ("feature", np.arange(config.code_dim))):
        coord = group.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=(name,))
        coord[...] = values
        if name != "feature":
            coord.attrs["units"] = "µm"
    group.create_array(
        _PROGRESS, shape=block_grid_shape(grid.shape, config.block), chunks=(1, 1), dtype="uint8", fill_value=0,
    )
    group.attrs.update(
        {
            **config.as_attrs(),
            **source,
            "slide_mpp": grid.slide_mpp,
            "grid_shape": list(grid.shape),
            "nic_version": __version__,
            "status": IN_PROGRESS,
        }
    )
    return group


def done_blocks(group: zarr.Group) -> np.ndarray:
    """Bool (block_y, block_x): the blocks already written."""
    return group[_PROGRESS][...].astype(bool)


def write_block(group: zarr.Group, block: Block, features: np.ndarray | None) -> None:
    """Write one block's features (code_dim, h, w) — or nothing, for a background block — and
    only then mark it done, so an interrupted write is redone on rerun."""
    if features is not None:
        group["features"][(slice(None), *block.slices)] = features.astype(np.float16)
    group[_PROGRESS][block.index] = 1


def mark_complete(group: zarr.Group) -> None:
    """Mark the slide complete, after checking that every block is written."""
    missing = int((~done_blocks(group)).sum())
    if missing:
        raise NicError(f"{group.attrs.get('source_path')}: {missing} blocks are not written yet")
    group.attrs["status"] = COMPLETE


def list_slides(store: str | os.PathLike, complete_only: bool = True) -> list[str]:
    """Slide ids in a store, sorted; only the complete ones unless told otherwise."""
    root = zarr.open_group(str(store), mode="r")
    ids = sorted(name for name, _ in root.groups())
    return [s for s in ids if not complete_only or slide_status(root, s) == COMPLETE]


def open_slide_tensor(store: str | os.PathLike, slide_id: str):
    """The compressed slide as a lazy xarray Dataset (features, tissue, y/x in µm)."""
    import xarray as xr

    return xr.open_zarr(str(store), group=slide_id, consolidated=False, zarr_format=3)


def describe_store(store: str | os.PathLike) -> list[dict]:
    """One row per slide: id, status, grid shape, encoded tissue cells, encoder and source."""
    root = zarr.open_group(str(store), mode="r")
    rows = []
    for slide_id in list_slides(store, complete_only=False):
        group = root[slide_id]
        attrs = group.attrs
        tissue = group["tissue"][...]
        rows.append(
            {
                "slide_id": slide_id,
                "status": attrs.get("status", IN_PROGRESS),
                "grid_shape": list(attrs.get("grid_shape", tissue.shape)),
                "tissue_cells": int((tissue >= attrs.get("min_tissue", 0.0)).sum()),
                "encoder": attrs.get("encoder"),
                "encoder_sha256": attrs.get("encoder_sha256"),
                "mpp": attrs.get("mpp"),
                "source_path": attrs.get("source_path"),
            }
        )
    return rows
