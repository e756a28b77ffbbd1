"""The compression grid: patch cells on a slide, chunk-aligned blocks of cells, µm coordinates.

A slide of ``width x height`` level-0 px at ``slide_mpp`` µm/px is cut into cells of ``stride``
px at the encoder's ``mpp``; cell ``(i, j)`` is encoded from the ``patch_size`` px patch whose
top-left corner is the cell's top-left corner. Only cells whose patch lies fully inside the slide
are kept (NIC: a slide of H x W px becomes a grid of H/128 x W/128 cells).

Blocks are rectangles of ``block`` x ``block`` cells that coincide with the Zarr chunks of the
output arrays, so each block is one task that writes chunks no other task touches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from nic_pipeline.runtime.arrays import array_namespace

DEFAULT_BLOCK = 256
"""Largest block side in cells (``--block``): one task and one shard file each; small slides get
smaller blocks (:func:`nic_pipeline.compress.store.slide_block`)."""

DEFAULT_MIN_TISSUE = 0.1
"""Tissue fraction a cell's patch needs to be encoded (``--min-tissue``): a patch that is mostly
background still carries the tissue at its edge."""


@dataclass(frozen=True)
class Grid:
    """Cells of ``stride`` px at ``mpp`` µm/px over a ``width x height`` px slide at ``slide_mpp``."""

    width: int
    height: int
    slide_mpp: float
    mpp: float
    patch_size: int
    stride: int

    @property
    def scale(self) -> float:
        """Level-0 px per grid px (2.0 for a 0.25 µm/px scan read at 0.5 µm/px)."""
        return self.mpp / self.slide_mpp

    @property
    def cell_um(self) -> float:
        """Side of one cell in µm."""
        return self.stride * self.mpp

    @property
    def patch_um(self) -> float:
        """Side of one cell's patch in µm (more than ``cell_um`` when patches overlap)."""
        return self.patch_size * self.mpp

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx): the cells whose whole patch lies inside the slide."""
        return (self._cells_along(self.height), self._cells_along(self.width))

    def _cells_along(self, length_px: int) -> int:
        length = length_px / self.scale  # in grid px
        if length < self.patch_size:
            return 0
        return int((length - self.patch_size) // self.stride) + 1

    def cell_origin_px(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 (x, y) px of the top-left corner of cells (rows, cols)."""
        step = self.stride * self.scale
        return np.round(cols * step).astype(np.int64), np.round(rows * step).astype(np.int64)

    def coords_um(self) -> tuple[np.ndarray, np.ndarray]:
        """(y, x) µm coordinates of the cell centres, for the store's coordinate variables."""
        ny, nx = self.shape
        centre = self.patch_size / 2 * self.mpp
        return (np.arange(ny) * self.cell_um + centre, np.arange(nx) * self.cell_um + centre)


@dataclass(frozen=True)
class Block:
    """A chunk-aligned rectangle of cells: rows [y0, y1) and columns [x0, x1)."""

    index: tuple[int, int]
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def patch_um(self) -> float:
        """Side of one cell's patch in µm (more than ``cell_um`` when patches overlap)."""
        return self.patch_size * self.mpp

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def slices(self) -> tuple[slice, slice]:
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))


def block_grid_shape(grid_shape: tuple[int, int], block: int) -> tuple[int, int]:
    """How many blocks of ``block`` cells cover a grid of ``grid_shape`` cells."""
    return (math.ceil(grid_shape[0] / block), math.ceil(grid_shape[1] / block))


def iter_blocks(grid_shape: tuple[int, int], block: int) -> Iterator[Block]:
    """Every block of the grid, row-major, clipped at the grid's edge."""
    ny, nx = grid_shape
    nby, nbx = block_grid_shape(grid_shape, block)
    for by in range(nby):
        for bx in range(nbx):
            y0, x0 = by * block, bx * block
            yield Block((by, bx), y0, min(y0 + block, ny), x0, min(x0 + block, nx))


def cell_coverage(mask, mask_um, cell_um: float, grid_shape, window_um: float | None = None):
    """Fraction of each grid cell covered by a mask: float32 (ny, nx), same namespace as ``mask``.

    Cell (i, j) covers [j, j + w) x [i, i + w) µm from (j, i) * cell_um, where the window w is
    ``window_um`` (a cell's whole patch, larger than the step when patches overlap) or else
    ``cell_um``; mask pixel (a, b) covers [b, b+1) x [a, a+1) * mask_um µm (one number, or (y, x)
    for anisotropic masks). The overlap is exact for any ratio of the two sizes (bilinear
    interpolation of the summed-area table is exact for piecewise-constant pixels); area beyond
    the mask counts as uncovered, so edge cells get their true fraction.
    """
    xp = array_namespace(mask)
    um_y, um_x = (mask_um, mask_um) if np.isscalar(mask_um) else mask_um
    ny, nx = (int(v) for v in grid_shape)
    h, w = mask.shape
    sat = xp.zeros((h + 1, w + 1), dtype=xp.float64)
    sat[1:, 1:] = xp.cumsum(xp.cumsum(xp.asarray(mask).astype(xp.float64), axis=0), axis=1)
    window = cell_um if window_um is None else window_um
    step_y, step_x = cell_um / um_y, cell_um / um_x  # cell step in mask pixels
    win_y, win_x = window / um_y, window / um_x  # window side in mask pixels
    ys = xp.arange(ny, dtype=xp.float64) * step_y
    xs = xp.arange(nx, dtype=xp.float64) * step_x
    ys = xp.clip(xp.concatenate([ys, ys + win_y]), 0, h)  # top edges, then bottom edges
    xs = xp.clip(xp.concatenate([xs, xs + win_x]), 0, w)
    rows = _interp_rows(sat, ys)  # (2 ny, w + 1)
    c = _interp_rows(rows.T, xs).T  # (2 ny, 2 nx): sums at every (top|bottom, left|right) corner
    area = c[ny:, nx:] - c[:ny, nx:] - c[ny:, :nx] + c[:ny, :nx]
    return (area / (win_y * win_x)).clip(0.0, 1.0).astype(xp.float32)


def _interp_rows(table, pos):
    """Linear interpolation of the rows of ``table`` at fractional row positions ``pos``."""
    xp = array_namespace(table)
    n = table.shape[0]
    i0 = xp.clip(xp.floor(pos).astype(xp.int64), 0, max(n - 2, 0))
    t = (pos - i0)[:, None]
    i1 = xp.minimum(i0 + 1, n - 1)
    return table[i0] * (1.0 - t) + table[i1] * t
