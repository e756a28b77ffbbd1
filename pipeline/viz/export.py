"""Heatmaps for slide viewers: GeoJSON cells for QuPath, and a pyramidal TIFF overlay.

**GeoJSON** (RFC 7946, as QuPath 0.4+ reads and writes it, `File > Import objects from file`): a
``FeatureCollection`` of one ``Feature`` per tissue cell, its ``geometry`` the cell's square as a
closed ``Polygon`` (counter-clockwise exterior ring) in level-0 pixels of the slide, origin at the
top-left corner, and its ``properties`` ``{"objectType": "tile", "measurements": {name: number}}``.
QuPath makes a tile (a detection) of each, so *Measure > Show measurement maps* colours the
cells by any measurement and the measurement table lists them. Cells without tissue are left out
(QuPath reads measurements as numbers; JSON has no NaN).

**Overlay**: the heatmap's colours (the cohort's scale, opacity growing with relevance, as in the
PNGs) as a tiled, zlib-compressed, pyramidal RGBA TIFF (reduced levels in SubIFDs, as OME-TIFF and
QuPath expect), its level 0 an integer power-of-two downsample of the slide's level 0 with the
resolution tags set, so a viewer can lay it over the slide (QuPath, ASAP's result overlay).
Written tile by tile from the cell grid: no level is ever held whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import tifffile

OBJECT_TYPE = "tile"
TILE = 256
PX_PER_CELL = 8  # the overlay draws a cell on at least this many pixels of its level 0


def cell_squares_px(x_um, y_um, step_um: float, slide_mpp: float):
    """Level-0 px edges of the cells: (x0, x1) per column and (y0, y1) per row, each cell the
    square of one step around its centre (cells tile the slide even where patches overlap)."""
    x_um, y_um = np.asarray(x_um, np.float64), np.asarray(y_um, np.float64)
    half = step_um / 2
    return ((x_um - half) / slide_mpp, (x_um + half) / slide_mpp), ((y_um - half) / slide_mpp, (y_um + half) / slide_mpp)


def cells_geojson(measurements: dict[str, np.ndarray], x_um, y_um, step_um: float, slide_mpp: float,
                  object_type: str = OBJECT_TYPE) -> dict:
    """A GeoJSON FeatureCollection of the cells where the first measurement is finite; each
    ``measurements`` entry is an (ny, nx) array, named as QuPath will show it."""
    (x0, x1), (y0, y1) = cell_squares_px(x_um, y_um, step_um, slide_mpp)
    names = list(measurements)
    arrays = [np.asarray(measurements[name], np.float64) for name in names]
    rows, cols = np.nonzero(np.isfinite(arrays[0]))
    features = []
    for r, c in zip(rows.tolist(), cols.tolist()):
        left, right, top, bottom = (round(float(v), 2) for v in (x0[c], x1[c], y0[r], y1[r]))
        # counter-clockwise when x runs right and y up, as RFC 7946 asks of an exterior ring
        ring = [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]
        values = {name: float(a[r, c]) for name, a in zip(names, arrays) if np.isfinite(a[r, c])}
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"objectType": object_type, "name": f"cell {r},{c}", "measurements": values}})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path, collection: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(collection, separators=(",", ":"), allow_nan=False))
    return path


def overlay_downsample(step_um: float, slide_mpp: float, px_per_cell: int = PX_PER_CELL) -> int:
    """The overlay's level-0 downsample of the slide: the largest power of two that still draws a
    cell on ``px_per_cell`` pixels (16 for 64 µm cells on a 0.5 µm/px slide)."""
    cell_px = step_um / slide_mpp
    return 2 ** max(0, int(math.floor(math.log2(max(1.0, cell_px / px_per_cell)))))


def write_overlay_tiff(path, rgba_cells: np.ndarray, x_um, y_um, step_um: float, slide_mpp: float,
                       slide_size_px: tuple[int, int], tile: int = TILE, px_per_cell: int = PX_PER_CELL) -> Path:
    """Write the RGBA cell colours (ny, nx, 4) uint8 as a pyramidal TIFF over a slide of
    ``slide_size_px`` (width, height) level-0 px at ``slide_mpp`` µm/px; returns the path."""
    rgba_cells = np.asarray(rgba_cells, np.uint8)
    downsample = overlay_downsample(step_um, slide_mpp, px_per_cell)
    width, height = (max(1, math.ceil(n / downsample)) for n in slide_size_px)
    levels = [(width, height, downsample)]
    while max(levels[-1][:2]) > tile:
        w, h, d = levels[-1]
        levels.append((max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2)), d * 2))
    padded = np.zeros((rgba_cells.shape[0] + 1, rgba_cells.shape[1] + 1, 4), np.uint8)  # last row/col: transparent
    padded[:-1, :-1] = rgba_cells
    left_um, top_um = float(np.asarray(x_um)[0]) - step_um / 2, float(np.asarray(y_um)[0]) - step_um / 2

    def cells_along(n_px: int, level_mpp: float, origin_um: float, n_cells: int) -> np.ndarray:
        centres_um = (np.arange(n_px) + 0.5) * level_mpp
        index = np.floor((centres_um - origin_um) / step_um).astype(np.int64)
        return np.where((index >= 0) & (index < n_cells), index, n_cells)  # outside the grid -> transparent

    def tiles(level_width: int, level_height: int, level_downsample: int):
        level_mpp = slide_mpp * level_downsample
        rows = cells_along(level_height, level_mpp, top_um, rgba_cells.shape[0])
        cols = cells_along(level_width, level_mpp, left_um, rgba_cells.shape[1])
        for ty in range(0, level_height, tile):
            for tx in range(0, level_width, tile):
                block = np.zeros((tile, tile, 4), np.uint8)
                r, c = rows[ty:ty + tile], cols[tx:tx + tile]
                block[:len(r), :len(c)] = padded[r[:, None], c[None, :]]
                yield block

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = dict(tile=(tile, tile), photometric="rgb", extrasamples=["unassalpha"], compression="zlib",
                   resolutionunit="CENTIMETER", dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=width * height * 4 > 2**31) as tif:
        for i, (w, h, d) in enumerate(levels):
            ppcm = 1e4 / (slide_mpp * d)
            extra = dict(subifds=len(levels) - 1, description=_description(slide_mpp, d, slide_size_px)) if i == 0 \
                else dict(subfiletype=1)
            tif.write(tiles(w, h, d), shape=(h, w, 4), resolution=(ppcm, ppcm), **options, **extra)
    return path


def _description(slide_mpp: float, downsample: int, slide_size_px) -> str:
    return json.dumps({"nic_overlay": True, "slide_mpp": slide_mpp, "downsample": downsample,
                       "slide_width": int(slide_size_px[0]), "slide_height": int(slide_size_px[1])})
