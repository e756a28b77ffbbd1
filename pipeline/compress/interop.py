"""Compressed cohorts to and from the MIL world's HDF5 feature files (CLAM, TRIDENT).

CLAM and TRIDENT keep one ``<slide>.h5`` per slide: ``features`` (N, C) and ``coords`` (N, 2),
the level-0 pixel (x, y) of each patch's top-left corner, with the patching settings as
attributes of ``coords`` (CLAM: ``patch_size``, ``patch_level``, ``downsample``, ``level_dim``;
TRIDENT: ``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``,
``name``). :func:`export_h5` writes both sets of attributes, so either tool reads a compressed
cohort directly; :func:`import_h5` places such bags back on a grid store, where NIC's slide
models (and ``nic view``) read them.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from nic_pipeline.compress.grid import Grid
from nic_pipeline.compress.store import (
    COMPLETE,
    CompressionConfig,
    consolidate,
    create_slide,
    list_slides,
    open_cohort,
    open_store,
)
from nic_pipeline.errors import NicError

def _magnification(mpp: float) -> float:
    """Objective magnification of a µm/px by the usual convention (1.0 = 10x, 0.5 = 20x, 0.25 = 40x);
    the same formula turns a magnification back into µm/px."""
    return round(10.0 / mpp, 2)


def export_h5(store: str | os.PathLike, out_dir: str | os.PathLike, slide_ids=None) -> list[Path]:
    """One CLAM/TRIDENT-style ``<slide_id>.h5`` per complete slide: the encoded cells only."""
    root, out_dir = open_cohort(store), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for slide_id in slide_ids or list_slides(store):
        group = root[slide_id]
        attrs = dict(group.attrs)
        grid = Grid(0, 0, attrs["slide_mpp"], attrs["mpp"], attrs["patch_size"], attrs["stride"])  # for its geometry
        rows, cols = np.nonzero(group["tissue"][...] >= attrs["min_tissue"])
        features = group["features"][...][:, rows, cols].T.astype(np.float32)
        x, y = grid.cell_origin_px(rows, cols)
        path = out_dir / f"{slide_id}.h5"
        with h5py.File(path, "w") as handle:
            handle.create_dataset("features", data=features)
            coords = handle.create_dataset("coords", data=np.stack([x, y], axis=1).astype(np.int64))
            patch0 = int(round(attrs["patch_size"] * grid.scale))
            coords.attrs.update({
                "patch_size": attrs["patch_size"], "patch_level": 0, "downsample": [grid.scale, grid.scale],
                "patch_size_level0": patch0, "level0_magnification": _magnification(attrs["slide_mpp"]),
                "target_magnification": _magnification(attrs["mpp"]),
                "overlap": attrs["patch_size"] - attrs["stride"], "name": slide_id,
                "level0_mpp": attrs["slide_mpp"], "mpp": attrs["mpp"],
            })
            handle["features"].attrs.update({"encoder": attrs["encoder"], "encoder_sha256": attrs["encoder_sha256"]})
        written.append(path)
    return written


def _h5_grid(coords: h5py.Dataset, slide_mpp: float | None, path: Path) -> tuple[Grid, np.ndarray, np.ndarray]:
    """The grid a bag's patches lie on (from its coords attributes), and each patch's cell."""
    attrs = dict(coords.attrs)
    patch = int(attrs.get("patch_size", 0))
    patch0 = float(attrs.get("patch_size_level0") or patch * np.atleast_1d(attrs.get("downsample", [1.0]))[0])
    if not patch0:
        raise NicError(f"{path}: its coords have neither patch_size_level0 nor patch_size")
    patch = patch or int(patch0)
    magnification = float(attrs.get("level0_magnification", -1))
    slide_mpp = slide_mpp or attrs.get("level0_mpp") or (_magnification(magnification) if magnification > 0 else None)
    if not slide_mpp:
        raise NicError(f"{path}: no µm/px in its attributes; pass --mpp")
    stride = patch - int(attrs.get("overlap", 0))
    step0 = patch0 * stride / patch
    cols, rows = np.round(coords[...] / step0).astype(int).T
    ny, nx = int(rows.max()) + 1, int(cols.max()) + 1
    width, height = int(np.ceil((nx - 1) * step0 + patch0)) + 1, int(np.ceil((ny - 1) * step0 + patch0)) + 1
    return Grid(width, height, float(slide_mpp), float(slide_mpp) * patch0 / patch, patch, stride), rows, cols


def import_h5(files, store: str | os.PathLike, encoder: str, mpp: float | None = None, block: int = 256) -> list[str]:
    """Place the bags of CLAM/TRIDENT ``.h5`` files on a grid store (one group per file); returns
    the slide ids. Cells with a patch get its code and tissue 1; the rest stay empty."""
    written, root = [], None
    for path in map(Path, files):
        with h5py.File(path, "r") as handle:
            features = handle["features"][...]
            grid, rows, cols = _h5_grid(handle["coords"], mpp, path)
        features = features.reshape(-1, features.shape[-1])  # TRIDENT may keep a batch axis
        config = CompressionConfig(encoder=encoder, encoder_sha256="imported", code_dim=int(features.shape[1]),
                                   mpp=grid.mpp, patch_size=grid.patch_size, stride=grid.stride, block=block,
                                   min_tissue=0.5, mask_mpp=0.0, precision="imported")
        root = root or open_store(store, config)
        tissue = np.zeros(grid.shape, np.float32)
        tissue[rows, cols] = 1.0
        group = create_slide(root, path.stem, grid, config, tissue,
                             {"source_path": str(path.resolve()), "source_fingerprint": f"h5:{path.stat().st_size}",
                              "mpp_source": "h5"})
        codes = np.zeros((config.code_dim, *grid.shape), np.float16)
        codes[:, rows, cols] = features.T
        group["features"][...] = codes
        group.attrs["status"] = COMPLETE
        written.append(path.stem)
    if written:
        consolidate(store)
    return written
