"""Synthetic H&E-like whole-slide images: the project's test, demo and low-SNR study data.

A slide is a deterministic function of slide coordinates and a seed:

* low-frequency fields (tissue sections, lesion blobs, fat, lymphoid aggregates, stain
  drift, pen marks) live on a coarse grid of one value per ``MASK_DOWNSAMPLE`` x
  ``MASK_DOWNSAMPLE`` level-0 pixels and are interpolated bilinearly per tile;
* high-frequency texture (nuclei, stroma fibres, fat vacuoles) is drawn from integer hashes
  of cell coordinates in slide µm, so it needs no memory, has no tile seams and is the same
  geometry at every pyramid level.

Every pyramid level is therefore rendered independently, tile by tile, and written as a
separate tiled-JPEG IFD with an Aperio-style description (OpenSlide and cuCIM both read it).
No level is ever held in memory. With ``texture="tiles:DIR"`` the tissue is a blended mosaic
of real tiles instead (normal classes as tissue, tumour classes as lesions).

The lesion fraction is defined on the coarse grid: ``lesion_px / tissue_px`` of the masks
returned in :class:`SlideTruth` and written beside each slide as PNGs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.dihedral import dihedral
from pipeline.errors import NicError
from pipeline.io.masks import mask_path, read_mask, write_mask

TILE = 256
MASK_DOWNSAMPLE = 32          # level-0 px per mask px (16 µm at 0.5 µm/px)
MIN_LEVEL_SIZE = 512          # add pyramid levels (factor 4) until the longest side is <= this
LEVEL_FACTOR = 4
BACKGROUND_RGB = (241.0, 239.0, 243.0)
IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}
LESION_WORDS = ("tumor", "tumour", "tum", "aca", "scc", "carcinoma", "cancer", "malignant")
BACKGROUND_WORDS = ("empty", "back", "background", "blank", "glass")
KNOWN_TILE_MPP = {"kather2016": 0.495, "nct_crc": 0.5, "nct-crc": 0.5, "lc25000": 1.7}
MAX_POOL = 32                 # real tiles kept per role (normal / lesion) per slide

# Stain optical-density vectors (rows: R, G, B absorbance per unit concentration).
_HEMATOXYLIN = np.array([0.651, 0.701, 0.290], np.float32)
_EOSIN = np.array([0.216, 0.801, 0.558], np.float32)
_PEN_OD = {
    "green": np.array([0.95, 0.30, 0.75], np.float32),
    "blue": np.array([0.95, 0.55, 0.12], np.float32),
    "red": np.array([0.10, 0.95, 0.70], np.float32),
}


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class CohortSpec:
    """What `nic synth` writes: N slides, a share of them positive, all from one seed."""

    n_slides: int = 4
    width: int = 8192
    height: int = 8192
    mpp: float = 0.5
    lesion_fraction: float = 0.05
    positive_fraction: float = 0.5
    seed: int = 0
    texture: str = "synthetic"
    tile_labels: Path | None = None
    lesion_classes: tuple[str, ...] | None = None
    pen_marks: bool = False
    tile_mpp: float | None = None
    artifacts: bool = False
    jpeg_quality: int = 90
    workers: int | None = None       # rendering threads per slide (None: up to 2 cores)


@dataclass
class SlideTruth:
    """Ground truth of one written slide. Masks are at 1/``mask_downsample`` of level 0."""

    path: Path
    width: int
    height: int
    mpp: float
    level_dimensions: list[tuple[int, int]]
    requested_lesion_fraction: float
    lesion_fraction: float                 # realized: lesion_mask.sum() / tissue_mask.sum()
    lesion_mask: np.ndarray                # bool (ceil(H/32), ceil(W/32))
    tissue_mask: np.ndarray                # bool, same shape
    pen_mask: np.ndarray                   # bool, same shape (all False without pen marks)
    mask_downsample: int = MASK_DOWNSAMPLE

    @property
    def label(self) -> int:
        return int(self.lesion_mask.any())

    @property
    def mask_mpp(self) -> float:
        return self.mpp * self.mask_downsample


# --------------------------------------------------------------------------- hashing & noise


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_PY = np.uint64(0x9E3779B97F4A7C15)
_PX = np.uint64(0xC2B2AE3D27D4EB4F)


def _key(seed: int, salt: int) -> np.uint64:
    """A 64-bit stream key from a seed and a salt (splitmix64 of both)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(salt) * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return np.uint64(z ^ (z >> 31))


def _hash01(iy: np.ndarray, ix: np.ndarray, key: np.uint64) -> np.ndarray:
    """Uniform [0, 1) float32 per integer lattice point: a pure function of (iy, ix, key)."""
    with np.errstate(over="ignore"):
        h = (np.asarray(iy).astype(np.uint64) * _PY) ^ (np.asarray(ix).astype(np.uint64) * _PX) ^ key
        h = (h ^ (h >> np.uint64(30))) * _MIX1
        h = (h ^ (h >> np.uint64(27))) * _MIX2
        h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 2**24)


def _interp_weights(coords: np.ndarray, smooth: bool) -> tuple[np.ndarray, int]:
    """(len(coords), k) weights interpolating lattice nodes first..first+k-1 at coords."""
    first = int(np.floor(coords.min()))
    rel = coords - first
    i = np.floor(rel).astype(np.int64)
    t = (rel - i).astype(np.float32)
    if smooth:
        t = t * t * (3 - 2 * t)
    k = int(i.max()) + 2
    w = np.zeros((coords.size, k), np.float32)
    rows = np.arange(coords.size)
    w[rows, i] = 1 - t
    w[rows, i + 1] = t
    return w, first


def value_noise(ys: np.ndarray, xs: np.ndarray, spacing: float, key: np.uint64) -> np.ndarray:
    """Smooth value noise in [-1, 1] on the separable grid ys x xs (same unit as spacing).

    Lattice values come from :func:`_hash01`, so the noise is a function of absolute
    coordinates only: tiles and pyramid levels agree, and nothing is precomputed.
    """
    wy, y0 = _interp_weights(np.asarray(ys, np.float64) / spacing, smooth=True)
    wx, x0 = _interp_weights(np.asarray(xs, np.float64) / spacing, smooth=True)
    iy = np.arange(y0, y0 + wy.shape[1])[:, None]
    ix = np.arange(x0, x0 + wx.shape[1])[None, :]
    lattice = _hash01(iy, ix, key) * 2 - 1
    return (wy @ lattice) @ np.ascontiguousarray(wx.T)


def fbm(ys, xs, spacing, key, octaves=3, gain=0.5):
    """Fractal sum of value-noise octaves (spacing halves per octave), roughly in [-1, 1]."""
    out = np.zeros((len(ys), len(xs)), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        out += amp * value_noise(ys, xs, spacing / 2**o, key + np.uint64(o + 1))
        total += amp
        amp *= gain
    return out / total


def _smoothstep(x):
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


# --------------------------------------------------------------------------- geometry


def pyramid_downsamples(width: int, height: int) -> list[int]:
    """Downsamples 1, 4, 16, ... until the level's longest side is <= MIN_LEVEL_SIZE px."""
    downs = [1]
    while max(width, height) / downs[-1] > MIN_LEVEL_SIZE:
        downs.append(downs[-1] * LEVEL_FACTOR)
    return downs


def level_dimensions(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every pyramid level (ceil division, so levels cover the slide)."""
    return [(-(-width // d), -(-height // d)) for d in pyramid_downsamples(width, height)]


def mask_shape(width: int, height: int) -> tuple[int, int]:
    return -(-height // MASK_DOWNSAMPLE), -(-width // MASK_DOWNSAMPLE)


def _signed_distance(f: np.ndarray, step_um: float) -> np.ndarray:
    """First-order signed distance (µm) to the zero level set of a smooth field f."""
    gy, gx = np.gradient(f.astype(np.float32), step_um)
    grad = np.sqrt(gy * gy + gx * gx)
    return np.clip(f / np.maximum(grad, 1e-6), -2000, 2000).astype(np.float32)


@dataclass
class _Fields:
    """Low-frequency slide content on the mask grid (one value per MASK_DOWNSAMPLE px)."""

    tissue_sd: np.ndarray      # signed distance to the tissue edge, µm (> 0 inside)
    lesion_sd: np.ndarray      # signed distance to the lesion edge, µm (> 0 inside)
    fat: np.ndarray            # 0..1 fat (adipose) weight
    lymph: np.ndarray          # 0..1 lymphoid aggregate weight
    stain: np.ndarray          # stain intensity multiplier around 1
    pen: np.ndarray            # 0..1 pen ink alpha
    pen_color: np.ndarray      # (3,) OD of the ink (per slide: one colour per stroke set)
    fold: np.ndarray           # 0..1 tissue fold (double thickness)
    tissue_mask: np.ndarray
    lesion_mask: np.ndarray

    def stack(self) -> np.ndarray:
        return np.stack([self.tissue_sd, self.lesion_sd, self.fat, self.lymph, self.stain, self.pen, self.fold])


def _tissue_field(gy_um, gx_um, width_um, height_um, rng, key):
    """Irregular tissue sections: 1-3 noisy ellipses along the slide's long axis, with tears."""
    long_is_x = width_um >= height_um
    long_um, short_um = (width_um, height_um) if long_is_x else (height_um, width_um)
    n = int(rng.integers(1, 4)) if long_um > 1.3 * short_um or rng.random() < 0.5 else 1
    band = long_um / n
    f = np.full((len(gy_um), len(gx_um)), -1.0, np.float32)
    for i in range(n):
        c_long = band * (i + 0.5 + rng.uniform(-0.08, 0.08))
        c_short = short_um * rng.uniform(0.42, 0.58)
        a = 0.44 * band * rng.uniform(0.75, 1.0)
        b = 0.40 * short_um * rng.uniform(0.7, 1.0)
        theta = rng.uniform(-0.25, 0.25) * (1.0 if a > 1.5 * b else 4.0)
        cy, cx = (c_short, c_long) if long_is_x else (c_long, c_short)
        ay, ax = (b, a) if long_is_x else (a, b)
        dy = (gy_um - cy)[:, None]
        dx = (gx_um - cx)[None, :]
        ct, st = math.cos(theta), math.sin(theta)
        u = (dx * ct + dy * st) / ax
        v = (-dx * st + dy * ct) / ay
        r = np.sqrt(u * u + v * v)
        scale = min(a, b)
        noise = 0.32 * fbm(gy_um, gx_um, 0.6 * scale, key + np.uint64(10 * i), octaves=4, gain=0.55)
        f = np.maximum(f, (1 - r + noise).astype(np.float32))
    # tears and holes: small gaps inside the sections
    holes = value_noise(gy_um, gx_um, 180.0, key + np.uint64(99))
    f -= 2.0 * np.clip(holes - 0.62, 0, None)
    return f


def _lesion_field(tissue, gy_um, gx_um, fraction, rng, key, step_um):
    """Lesion blobs inside the tissue whose area is exactly round(fraction * tissue px)."""
    from scipy import ndimage

    n_tissue = int(tissue.sum())
    n_lesion = int(round(fraction * n_tissue))
    if fraction <= 0 or n_tissue == 0:
        return np.full(tissue.shape, -1.0, np.float32), np.zeros_like(tissue)
    n_lesion = max(1, min(n_lesion, n_tissue))
    depth = ndimage.distance_transform_edt(tissue).astype(np.float32)
    n_blobs = int(rng.choice([1, 1, 2, 3]))
    radius_um = math.sqrt(n_lesion / n_blobs / math.pi) * step_um
    ys, xs = np.nonzero(tissue)
    weights = depth[ys, xs].astype(np.float64) ** 2
    centres = rng.choice(len(ys), size=n_blobs, replace=True, p=weights / weights.sum())
    dist = np.full(tissue.shape, np.inf, np.float32)
    for c in centres:
        s = rng.uniform(0.7, 1.3)
        d = np.hypot((gy_um - gy_um[ys[c]])[:, None], (gx_um - gx_um[xs[c]])[None, :]) / s
        dist = np.minimum(dist, d.astype(np.float32))
    spacing = max(2 * step_um, 0.8 * radius_um)
    field_ = dist + 0.45 * radius_um * fbm(gy_um, gx_um, spacing, key, octaves=3)
    values = np.partition(field_[tissue], n_lesion - 1)
    lo = values[n_lesion - 1]                               # the n-th smallest value
    hi = values[n_lesion:].min() if n_lesion < values.size else lo + step_um
    threshold = 0.5 * (lo + hi)
    lesion = (field_ < threshold) & tissue
    return (threshold - field_).astype(np.float32), lesion


def _pen_field(shape, rng, step_um):
    """1-3 hand-drawn strokes (smooth random curves) as an ink alpha on the mask grid."""
    from scipy import ndimage
    from skimage.draw import line

    h, w = shape
    ink = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 4))):
        n = 40
        p0 = rng.uniform([0.05 * h, 0.05 * w], [0.95 * h, 0.95 * w])
        ang = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.2, 0.5) * max(h, w)
        curve = np.cumsum(rng.normal(0, 0.25, n)) + ang
        ys = p0[0] + np.concatenate([[0], np.cumsum(np.sin(curve[:-1]))]) * length / n
        xs = p0[1] + np.concatenate([[0], np.cumsum(np.cos(curve[:-1]))]) * length / n
        ys = np.clip(ys, 0, h - 1).astype(int)
        xs = np.clip(xs, 0, w - 1).astype(int)
        for i in range(n - 1):
            rr, cc = line(ys[i], xs[i], ys[i + 1], xs[i + 1])
            ink[rr, cc] = True
    width_px = max(1.0, rng.uniform(60, 140) / step_um)     # stroke half-width 60-140 µm
    dist = ndimage.distance_transform_edt(~ink)
    return np.clip((width_px - dist) / 1.5 + 0.5, 0, 1).astype(np.float32)


def build_fields(width: int, height: int, mpp: float, seed: int, lesion_fraction: float,
                 pen_marks: bool = False, artifacts: bool = False) -> _Fields:
    """All low-frequency content of one slide, on the mask grid, from the seed."""
    rng = np.random.default_rng([seed, 7919])
    key = _key(seed, 1)
    gh, gw = mask_shape(width, height)
    step_um = MASK_DOWNSAMPLE * mpp
    gy_um = (np.arange(gh) + 0.5) * step_um
    gx_um = (np.arange(gw) + 0.5) * step_um
    tissue_f = _tissue_field(gy_um, gx_um, width * mpp, height * mpp, rng, key)
    tissue = tissue_f > 0
    lesion_f, lesion = _lesion_field(tissue, gy_um, gx_um, lesion_fraction, rng, key + np.uint64(500), step_um)
    fat = _smoothstep((fbm(gy_um, gx_um, 700.0, key + np.uint64(600), octaves=2) - 0.25) * 5)
    fat *= ~lesion
    lymph = _smoothstep((fbm(gy_um, gx_um, 320.0, key + np.uint64(700), octaves=3) - 0.45) * 6)
    lymph *= ~lesion
    stain = (1.0 + 0.12 * fbm(gy_um, gx_um, 2500.0, key + np.uint64(800), octaves=2)).astype(np.float32)
    pen = _pen_field((gh, gw), rng, step_um) if pen_marks else np.zeros((gh, gw), np.float32)
    pen_color = _PEN_OD[str(rng.choice(list(_PEN_OD)))]
    if artifacts:
        fold = _smoothstep((np.abs(value_noise(gy_um, gx_um, 1500.0, key + np.uint64(900))) < 0.04) * 1.0)
        fold = (fold * (value_noise(gy_um, gx_um, 4000.0, key + np.uint64(901)) > 0.3)).astype(np.float32)
    else:
        fold = np.zeros((gh, gw), np.float32)
    return _Fields(
        tissue_sd=_signed_distance(tissue_f, step_um),
        lesion_sd=_signed_distance(lesion_f, step_um) if lesion.any() else np.full((gh, gw), -2000, np.float32),
        fat=fat.astype(np.float32), lymph=lymph.astype(np.float32), stain=stain, pen=pen,
        pen_color=pen_color, fold=fold, tissue_mask=tissue, lesion_mask=lesion,
    )


def _sample_fields(stack: np.ndarray, ys0: np.ndarray, xs0: np.ndarray) -> np.ndarray:
    """Bilinear samples (n_fields, len(ys0), len(xs0)) of the grid stack at level-0 px coords."""
    n, gh, gw = stack.shape
    gy = np.clip(ys0 / MASK_DOWNSAMPLE - 0.5, 0, gh - 1)
    gx = np.clip(xs0 / MASK_DOWNSAMPLE - 0.5, 0, gw - 1)
    wy, y0 = _interp_weights(gy, smooth=False)
    wx, x0 = _interp_weights(gx, smooth=False)
    crop = np.ascontiguousarray(stack[:, y0:y0 + wy.shape[1], x0:x0 + wx.shape[1]])
    wy = np.ascontiguousarray(wy[:, : crop.shape[1]])
    wxt = np.ascontiguousarray(wx[:, : crop.shape[2]].T)
    return (wy @ crop) @ wxt


# --------------------------------------------------------------------------- texture


def _blob_layer(yw, xw, cell_um, key, radius_um, elong, presence, edge_um, dark_range=(0.85, 1.15)):
    """Ellipses on a jittered grid in µm: (coverage 0..1, darkness) per pixel.

    One ellipse per grid cell, kept inside its cell, so each pixel only looks at its own
    cell: a handful of gathers, no loops. ``presence`` (scalar or per pixel) is the chance a
    cell holds one.
    """
    ci = np.floor(yw / cell_um).astype(np.int64)
    cj = np.floor(xw / cell_um).astype(np.int64)
    i0, j0 = ci.min(), cj.min()
    ni, nj = ci.max() - i0 + 1, cj.max() - j0 + 1
    gi = np.arange(i0, i0 + ni)[:, None]
    gj = np.arange(j0, j0 + nj)[None, :]
    u = [_hash01(gi, gj, key + np.uint64(s)).ravel() for s in range(7)]
    r = radius_um[0] + (radius_um[1] - radius_um[0]) * u[0]
    e = elong[0] + (elong[1] - elong[0]) * u[1]
    a = np.minimum(r * np.sqrt(e), 0.48 * cell_um)        # semi-major, fits the cell
    b = a / e
    room = np.maximum(cell_um / 2 - a, 0)
    cy = (gi.ravel().repeat(nj) + 0.5) * cell_um + (u[2] * 2 - 1) * room
    cx = (np.tile(gj.ravel(), ni) + 0.5) * cell_um + (u[3] * 2 - 1) * room
    ang = u[4] * np.pi
    params = np.stack([cy, cx, np.cos(ang), np.sin(ang), 1 / a, 1 / b,
                       a / (2 * edge_um), u[5], dark_range[0] + (dark_range[1] - dark_range[0]) * u[6]]).astype(np.float32)
    idx = (ci - i0) * nj + (cj - j0)
    p = params[:, idx]
    dy = yw - p[0]
    dx = xw - p[1]
    uu = (dx * p[2] + dy * p[3]) * p[4]
    vv = (dy * p[2] - dx * p[3]) * p[5]
    cov = np.clip((1 - (uu * uu + vv * vv)) * p[6], 0, 1)
    cov *= p[7] < presence
    return cov, p[8]


def _voronoi(yw, xw, cell_um, key):
    """Per pixel: half the gap to the second-nearest seed (µm) and the nearest seed's uniform.

    Seeds are one jittered point per grid cell (Worley noise); the 3 x 3 neighbourhood is
    searched with gathers from a per-tile seed table.
    """
    ci = np.floor(yw / cell_um).astype(np.int64)
    cj = np.floor(xw / cell_um).astype(np.int64)
    i0, j0 = ci.min() - 1, cj.min() - 1
    ni, nj = ci.max() - i0 + 2, cj.max() - j0 + 2
    gi = np.arange(i0, i0 + ni)[:, None]
    gj = np.arange(j0, j0 + nj)[None, :]
    py = ((gi + 0.1 + 0.8 * _hash01(gi, gj, key)) * cell_um).astype(np.float32).ravel()
    px = ((gj + 0.1 + 0.8 * _hash01(gi, gj, key + np.uint64(1))) * cell_um).astype(np.float32).ravel()
    pu = _hash01(gi, gj, key + np.uint64(2)).ravel()
    base = (ci - i0) * nj + (cj - j0)
    d1 = np.full(yw.shape, np.inf, np.float32)
    d2 = np.full(yw.shape, np.inf, np.float32)
    u1 = np.zeros(yw.shape, np.float32)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            idx = base + (di * nj + dj)
            dist = np.hypot(yw - py[idx], xw - px[idx])
            closer = dist < d1
            d2 = np.where(closer, d1, np.minimum(d2, dist))
            u1 = np.where(closer, pu[idx], u1)
            d1 = np.where(closer, dist, d1)
    return 0.5 * (d2 - d1), u1


class _Renderer:
    """Renders any region of the slide at any downsample from the fields and the seed."""

    def __init__(self, fields: _Fields, width, height, mpp, seed, tiles: _TilePools | None = None):
        self.fields = fields
        self.stack = fields.stack()
        self.width, self.height, self.mpp, self.seed = width, height, mpp, seed
        self.key = _key(seed, 2)
        self.tiles = tiles
        rng = np.random.default_rng([seed, 104729])
        # per-slide stain variation (hue and strength), as between labs/batches
        self.h_vec = (_HEMATOXYLIN * rng.uniform(0.85, 1.15, 3)).astype(np.float32)
        self.e_vec = (_EOSIN * rng.uniform(0.85, 1.15, 3)).astype(np.float32)
        self.h_gain = np.float32(rng.uniform(0.85, 1.15))
        self.e_gain = np.float32(rng.uniform(0.8, 1.2))
        self.bg_od = (-np.log(np.array(BACKGROUND_RGB, np.float32) / 255)).astype(np.float32)

    # -- helpers
    def _noise(self, px_um, ys_um, xs_um, spacing, salt):
        """Value noise at this spacing (µm), or 0 where pixels of px_um are too coarse to show it."""
        if spacing < 1.5 * px_um:
            return np.float32(0)
        return value_noise(ys_um, xs_um, spacing, self.key + np.uint64(salt))

    def background(self, h, w) -> np.ndarray:
        return np.broadcast_to(np.array(BACKGROUND_RGB, np.uint8), (h, w, 3))

    def render(self, y0: int, x0: int, h: int, w: int, d: int) -> np.ndarray:
        """(h, w, 3) uint8 of the region whose top-left is (y0, x0) in level-d pixels."""
        ys0 = (y0 + np.arange(h) + 0.5) * d          # level-0 px of pixel centres
        xs0 = (x0 + np.arange(w) + 0.5) * d
        fl = _sample_fields(self.stack, ys0, xs0)
        pen = fl[5]
        if fl[0].max() < -40 and pen.max() <= 0:
            return np.array(self.background(h, w))
        mpp = self.mpp
        ys, xs = ys0 * mpp, xs0 * mpp                # µm
        px_um = d * mpp
        edge_um = max(1.5, 0.7 * px_um)
        ragged = 5.0 * self._noise(px_um, ys, xs, 12.0, 1)
        tissue_a = np.clip((fl[0] + ragged) / edge_um + 0.5, 0, 1)
        lesion_sd = fl[1] + 10.0 * self._noise(px_um, ys, xs, 25.0, 2)
        lesion_a = np.clip(lesion_sd / edge_um + 0.5, 0, 1) * tissue_a
        if self.tiles is not None:
            rgb = self._render_tiles(ys0, xs0, d, tissue_a, lesion_a)
        else:
            rgb = self._render_he(ys, xs, px_um, fl, tissue_a, lesion_a)
        if pen.max() > 0:
            ink = pen * (0.75 + 0.25 * self._noise(px_um, ys, xs, 40.0, 3))
            rgb = rgb * np.exp(-ink[..., None] * self.fields.pen_color)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    def _render_he(self, ys, xs, px_um, fl, tissue_a, lesion_a):
        """Procedural H&E as stain concentrations -> Beer-Lambert RGB (float)."""
        fat_w, lymph_w, stain, fold = fl[2], fl[3], fl[4], fl[6]
        detail = min(1.0, 1.2 / px_um)               # fine texture fades at coarse levels
        # domain warp so nuclei do not sit on a visible grid
        ys32, xs32 = ys.astype(np.float32), xs.astype(np.float32)
        wy = ys32[:, None] + 4.0 * self._noise(px_um, ys, xs, 18.0, 10)
        wx = xs32[None, :] + 4.0 * self._noise(px_um, ys, xs, 18.0, 11)
        edge_um = max(0.6, 0.7 * px_um)
        # stroma: wavy eosinophilic fibres
        warp = (70.0 * self._noise(px_um, ys, xs, 160.0, 12) + 25.0 * self._noise(px_um, ys, xs, 45.0, 15)
                + 5.0 * self._noise(px_um, ys, xs, 14.0, 13))
        fib = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi / 7.0) * (ys32[:, None] + warp))
        gaps = _smoothstep((self._noise(px_um, ys, xs, 11.0, 14) + 0.5 * self._noise(px_um, ys, xs, 5.0, 16) + 0.7) * 2.0)
        e = (0.42 + 0.38 * (1 - detail * 0.6 * (1 - fib))) * (0.7 + 0.3 * (gaps * detail + (1 - detail) * 0.8))
        e *= 0.85 + 0.15 * self._noise(px_um, ys, xs, 300.0, 19)
        hcon = np.full_like(e, 0.07)
        # fibroblast nuclei (elongated, sparse) and lymphocytes (small, round, dark)
        cov, dark = _blob_layer(wy, wx, 14.0, self.key + np.uint64(100), (2.2, 3.0), (2.5, 4.0), 0.35, edge_um)
        hcon += cov * 1.1 * dark
        e *= 1 - 0.4 * cov
        lym_presence = 0.08 + 0.85 * lymph_w
        cov, dark = _blob_layer(wy, wx, 8.5, self.key + np.uint64(200), (2.6, 3.3), (1.0, 1.25), lym_presence, edge_um)
        hcon += cov * 1.6 * dark
        e *= 1 - 0.6 * cov
        # fat: polygonal clear adipocytes (Voronoi cells) with thin pink septa
        if fat_w.max() > 0.02:
            fy = wy + 12.0 * self._noise(px_um, ys, xs, 90.0, 17)
            fx = wx + 12.0 * self._noise(px_um, ys, xs, 90.0, 18)
            border, u = _voronoi(fy, fx, 75.0, self.key + np.uint64(300))
            clear = (u < fat_w) * _smoothstep((border - 1.2) / max(1.0, px_um))
            e *= 1 - 0.95 * clear
            hcon *= 1 - 0.95 * clear
        # tumour: sheets of large, crowded, pleomorphic, hyperchromatic nuclei
        if lesion_a.max() > 0:
            ecyt = 0.42 + 0.08 * self._noise(px_um, ys, xs, 30.0, 20)
            hcyt = np.full_like(ecyt, 0.28)
            cov, dark = _blob_layer(wy, wx, 12.0, self.key + np.uint64(400), (3.6, 5.6), (1.0, 1.7), 0.9, edge_um, (0.8, 1.35))
            chrom = 0.8 + 0.4 * detail * self._noise(px_um, ys, xs, 1.2, 21)
            hcyt += cov * 1.55 * dark * chrom
            ecyt *= 1 - 0.5 * cov
            cov2, dark2 = _blob_layer(wy + 5.0, wx + 5.0, 12.0, self.key + np.uint64(450), (3.4, 5.0), (1.0, 1.6), 0.35, edge_um, (0.8, 1.3))
            hcyt = np.maximum(hcyt, 0.28 + cov2 * 1.45 * dark2 * chrom)
            e = e * (1 - lesion_a) + ecyt * lesion_a
            hcon = hcon * (1 - lesion_a) + hcyt * lesion_a
        thick = tissue_a * stain * (1 + 0.9 * fold)
        hcon *= thick * self.h_gain
        e *= thick * self.e_gain
        od = hcon[..., None] * self.h_vec + e[..., None] * self.e_vec + self.bg_od
        return 255.0 * np.exp(-od)

    def _render_tiles(self, ys0, xs0, d, tissue_a, lesion_a):
        pools = self.tiles
        bg = np.array(BACKGROUND_RGB, np.float32)
        rgb = np.empty((len(ys0), len(xs0), 3), np.float32)
        rgb[:] = bg
        if tissue_a.max() > 0:
            normal = pools.mosaic("normal", ys0, xs0, d, self.key + np.uint64(1000))
            if lesion_a.max() > 0:
                lesion = pools.mosaic("lesion", ys0, xs0, d, self.key + np.uint64(2000))
                normal += lesion_a[..., None] * (lesion - normal)
            rgb += tissue_a[..., None] * (normal - bg)
        return rgb


# --------------------------------------------------------------------------- real tiles


def _guess_tile_mpp(source: str) -> float:
    low = source.lower()
    for name, mpp in KNOWN_TILE_MPP.items():
        if name in low:
            return mpp
    return 0.5


def _is_lesion(label: str, lesion_classes) -> bool:
    if lesion_classes is not None:
        return label in lesion_classes
    low = label.lower()
    return any(w in low for w in LESION_WORDS)


def _is_background(label: str) -> bool:
    low = label.lower()
    return any(w in low for w in BACKGROUND_WORDS)


def list_tiles(directory: Path, tile_labels: Path | None = None) -> list[tuple[Path, str]]:
    """(path, class) of every tile: class sub-folders of DIR, or a path,label[,group] CSV."""
    directory = Path(directory)
    if tile_labels is not None:
        import pandas as pd

        table = pd.read_csv(tile_labels)
        if not {"path", "label"} <= set(table.columns):
            raise NicError(f"{tile_labels}: needs columns path,label (got {', '.join(table.columns)})")
        out = []
        for p, label in zip(table["path"], table["label"]):
            path = Path(p)
            if not path.is_absolute():
                path = directory / p if (directory / p).exists() else Path(tile_labels).parent / p
            out.append((path, str(label)))
        return out
    if not directory.is_dir():
        raise NicError(f"{directory}: tile folder not found (use --texture tiles:DIR with class sub-folders)")
    out = [(p, sub.name) for sub in sorted(directory.iterdir()) if sub.is_dir()
           for p in sorted(sub.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not out:
        raise NicError(f"{directory}: no tiles in class sub-folders (or give --tile-labels CSV)")
    return out


class _TilePools:
    """Normal and lesion tiles (uint8) rescaled to the slide's µm/px at downsamples 1 and 4."""

    OVERLAP = 0.12

    def __init__(self, directory, tile_labels, lesion_classes, tile_mpp, mpp, seed, need_lesion):
        from PIL import Image

        entries = list_tiles(directory, tile_labels)
        source = f"{directory} {tile_labels or ''}"
        self.tile_mpp = tile_mpp if tile_mpp else _guess_tile_mpp(source)
        roles = {"normal": [], "lesion": []}
        classes = {path: label for path, label in entries}
        self.classes: dict[str, np.ndarray] = {}
        for path, label in entries:
            if _is_lesion(label, lesion_classes):
                roles["lesion"].append(path)
            elif not _is_background(label):
                roles["normal"].append(path)
        if not roles["normal"]:
            raise NicError(f"{directory}: no normal (non-lesion, non-background) tiles; check --lesion-classes")
        if need_lesion and not roles["lesion"]:
            classes = sorted({label for _, label in entries})
            raise NicError(f"{directory}: no lesion tiles among classes {classes}; name them with --lesion-classes")
        rng = np.random.default_rng([seed, 31337])
        self.size0 = None
        self.images: dict[str, dict[int, list[np.ndarray]]] = {}
        for role, paths in roles.items():
            if not paths:
                continue
            chosen = [paths[i] for i in sorted(rng.choice(len(paths), min(MAX_POOL, len(paths)), replace=False))]
            self.images[role] = {1: [], 4: []}
            names = sorted({classes[p] for p in chosen})
            self.classes[role] = np.array([names.index(classes[p]) for p in chosen])
            for path in chosen:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    side = min(im.size)
                    im = im.crop((0, 0, side, side))
                    s0 = max(8, int(round(side * self.tile_mpp / mpp)))
                    self.size0 = s0 if self.size0 is None else self.size0
                    for d in (1, 4):
                        sd = max(2, int(round(self.size0 / d)))
                        self.images[role][d].append(np.asarray(im.resize((sd, sd), Image.Resampling.BICUBIC)))
        self.stride0 = max(4, int(round(self.size0 * (1 - self.OVERLAP))))

    def _pick(self, role, gi, gj, key) -> np.ndarray:
        """Tile index per mosaic cell: classes form patches a few tiles wide, tiles vary within."""
        cls = self.classes[role]
        n_cls = int(cls.max()) + 1
        yc = (gi.ravel() + 0.5) * 1.0
        xc = (gj.ravel() + 0.5) * 1.0
        score = np.stack([value_noise(yc, xc, 3.5, key + np.uint64(100 + c)) for c in range(n_cls)])
        chosen_cls = score.argmax(axis=0)
        u = _hash01(gi, gj, key)
        members = [np.nonzero(cls == c)[0] for c in range(n_cls)]
        counts = np.array([len(m) for m in members])
        k = (u * counts[chosen_cls]).astype(int)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        order = np.concatenate(members)
        return order[offsets[chosen_cls] + k]

    def mosaic(self, role, ys0, xs0, d, key) -> np.ndarray:
        """Feather-blended mosaic of this role's tiles over the pixels ys0 x xs0 (level-0 coords)."""
        images = self.images[role][d]
        sd = images[0].shape[0]
        st = self.stride0
        margin = (self.size0 - st) / 2
        h, w = len(ys0), len(xs0)
        acc = np.zeros((h, w, 3), np.float32)
        wsum = np.zeros((h, w), np.float32)
        ramp = max(1.0, 2 * margin / d)
        t = np.arange(sd) + 0.5
        win = np.clip(np.minimum(t, sd - t) / ramp, 0.02, 1).astype(np.float32)
        # level-d pixel index of each output pixel
        py = np.floor(ys0 / d).astype(np.int64)
        px = np.floor(xs0 / d).astype(np.int64)
        i_lo = int(np.floor((ys0[0] + margin - self.size0) / st))
        i_hi = int(np.floor((ys0[-1] + margin) / st))
        j_lo = int(np.floor((xs0[0] + margin - self.size0) / st))
        j_hi = int(np.floor((xs0[-1] + margin) / st))
        gi = np.arange(i_lo, i_hi + 1)[:, None]
        gj = np.arange(j_lo, j_hi + 1)[None, :]
        pick = self._pick(role, gi, gj, key)
        flip = (_hash01(gi, gj, key + np.uint64(1)) * 8).astype(int)
        for a, i in enumerate(range(i_lo, i_hi + 1)):
            top = int(np.floor((i * st - margin) / d))
            rows = py - top
            rsel = np.nonzero((rows >= 0) & (rows < sd))[0]
            if rsel.size == 0:
                continue
            for b, j in enumerate(range(j_lo, j_hi + 1)):
                left = int(np.floor((j * st - margin) / d))
                cols = px - left
                csel = np.nonzero((cols >= 0) & (cols < sd))[0]
                if csel.size == 0:
                    continue
                img = images[pick[a, b]]
                img = dihedral(img, int(flip[a, b]), dims=(0, 1))
                r0, r1 = rsel[0], rsel[-1] + 1
                c0, c1 = csel[0], csel[-1] + 1
                patch = img[rows[r0]:rows[r1 - 1] + 1, cols[c0]:cols[c1 - 1] + 1]
                wgt = win[rows[r0]:rows[r1 - 1] + 1, None] * win[None, cols[c0]:cols[c1 - 1] + 1]
                if patch.shape[:2] != (r1 - r0, c1 - c0):      # d does not divide: index exactly
                    patch = img[rows[r0:r1]][:, cols[c0:c1]]
                    wgt = win[rows[r0:r1], None] * win[None, cols[c0:c1]]
                acc[r0:r1, c0:c1] += wgt[..., None] * patch
                wsum[r0:r1, c0:c1] += wgt
        return acc / np.maximum(wsum, 1e-6)[..., None]


def parse_texture(texture: str, tile_labels: Path | None) -> Path | None:
    """None for 'synthetic', else the tile folder of 'tiles:DIR' (or 'tiles' + a labels CSV)."""
    if texture == "synthetic":
        return None
    if texture.startswith("tiles"):
        rest = texture[len("tiles"):].lstrip(":")
        if rest:
            return Path(rest)
        if tile_labels is not None:
            return Path(tile_labels).parent
    raise NicError(f"unknown texture {texture!r}: use 'synthetic' or 'tiles:DIR'")


# --------------------------------------------------------------------------- writing


def aperio_description(width: int, height: int, mpp: float, quality: int = 90) -> str:
    """The ImageDescription that makes OpenSlide and cuCIM treat the file as Aperio SVS."""
    return (f"Aperio Image Library v12.0.0 \n{width}x{height} [0,0 {width}x{height}] "
            f"({TILE}x{TILE}) JPEG Q={quality}|AppMag = 20|MPP = {mpp}")


def _render_tile(renderer: _Renderer, d: int, lw: int, lh: int, ty: int, tx: int) -> np.ndarray:
    """One (256, 256, 3) tile of the level with downsample d; only its part inside the level is drawn.

    Levels coarser than 4 are rendered at downsample 4 and box-averaged, in blocks of
    256 x 256 render px (cache-sized), so fine texture is anti-aliased and memory bounded.
    """
    d_r = min(d, LEVEL_FACTOR)
    f = d // d_r
    block = max(1, TILE // f)
    th, tw = min(TILE, lh - ty), min(TILE, lw - tx)
    tile = np.zeros((TILE, TILE, 3), np.uint8)
    if f == 1:
        tile[:th, :tw] = renderer.render(ty, tx, th, tw, d)
        return tile
    for by in range(0, th, block):
        for bx in range(0, tw, block):
            bh, bw = min(block, th - by), min(block, tw - bx)
            big = renderer.render((ty + by) * f, (tx + bx) * f, bh * f, bw * f, d_r)
            small = big.reshape(bh, f, bw, f, 3).mean(axis=(1, 3))
            tile[by:by + bh, bx:bx + bw] = np.clip(small + 0.5, 0, 255).astype(np.uint8)
    return tile


def _level_tiles(renderer: _Renderer, d: int, lw: int, lh: int, bar, workers: int = 1):
    """Yield the tiles of one level in row-major order, rendered by `workers` threads.

    At most 2 x workers tiles are in flight, so memory does not grow with the slide.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    coords = ((ty, tx) for ty in range(0, lh, TILE) for tx in range(0, lw, TILE))
    if workers <= 1:
        for ty, tx in coords:
            tile = _render_tile(renderer, d, lw, lh, ty, tx)
            if bar is not None:
                bar.update(1)
            yield tile
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for ty, tx in coords:
            pending.append(pool.submit(_render_tile, renderer, d, lw, lh, ty, tx))
            if len(pending) >= 2 * workers:
                if bar is not None:
                    bar.update(1)
                yield pending.popleft().result()
        while pending:
            if bar is not None:
                bar.update(1)
            yield pending.popleft().result()


def _write_pyramid(path: Path, renderer: _Renderer, quality: int, progress: bool, workers: int = 1):
    """Stream every level into its own tiled-JPEG IFD; return the level dimensions."""
    import tifffile
    from tqdm import tqdm

    width, height, mpp = renderer.width, renderer.height, renderer.mpp
    dims = level_dimensions(width, height)
    downs = pyramid_downsamples(width, height)
    n_tiles = sum(-(-w // TILE) * -(-h // TILE) for w, h in dims)
    bar = tqdm(total=n_tiles, unit="tile", desc=path.name, leave=False) if progress else None
    try:
        with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**32 - 2**28) as tw:
            for level, ((lw, lh), d) in enumerate(zip(dims, downs)):
                res = 1e4 / (mpp * d)                       # px per cm
                tw.write(
                    _level_tiles(renderer, d, lw, lh, bar, workers),
                    shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE),
                    photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                    description=aperio_description(width, height, mpp, quality) if level == 0 else None,
                    resolution=(res, res), resolutionunit="CENTIMETER", metadata=None,
                    subfiletype=0, maxworkers=1,
                )
    finally:
        if bar is not None:
            bar.close()
    return dims


def write_synthetic_slide(path, width: int, height: int, mpp: float = 0.5, seed: int = 0,
                          lesion_fraction: float = 0.0, texture: str = "synthetic",
                          pen_marks: bool = False, *, tile_labels: Path | None = None,
                          lesion_classes: tuple[str, ...] | None = None, tile_mpp: float | None = None,
                          artifacts: bool = False, jpeg_quality: int = 90,
                          progress: bool = False, workers: int | None = None) -> SlideTruth:
    """Write one pyramidal tiled-JPEG Aperio-style TIFF and return its ground truth.

    ``lesion_fraction`` is the lesion area as a share of the tissue area (0 = negative
    slide). Same arguments -> byte-identical file (whatever ``workers``, the number of
    rendering threads; default: up to 2 CPU cores).
    """
    if width < 1 or height < 1:
        raise NicError(f"{path}: width and height must be positive (got {width} x {height})")
    if not 0 <= lesion_fraction < 1:
        raise NicError(f"{path}: lesion fraction must be in [0, 1) (got {lesion_fraction})")
    if mpp <= 0:
        raise NicError(f"{path}: mpp must be positive (got {mpp})")
    from threadpoolctl import threadpool_limits

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with threadpool_limits(limits=1, user_api="blas"):     # tiny matmuls: threads only cost
        return _write_slide(path, width, height, mpp, seed, lesion_fraction, texture, pen_marks,
                            tile_labels, lesion_classes, tile_mpp, artifacts, jpeg_quality, progress,
                            workers if workers is not None else min(2, os.cpu_count() or 1))


def _write_slide(path, width, height, mpp, seed, lesion_fraction, texture, pen_marks,
                 tile_labels, lesion_classes, tile_mpp, artifacts, jpeg_quality, progress, workers) -> SlideTruth:
    fields = build_fields(width, height, mpp, seed, lesion_fraction, pen_marks, artifacts)
    tile_dir = parse_texture(texture, tile_labels)
    pools = None
    if tile_dir is not None:
        pools = _TilePools(tile_dir, tile_labels, lesion_classes, tile_mpp, mpp, seed,
                           need_lesion=bool(fields.lesion_mask.any()))
    renderer = _Renderer(fields, width, height, mpp, seed, pools)
    dims = _write_pyramid(path, renderer, jpeg_quality, progress, workers)
    tissue_px = int(fields.tissue_mask.sum())
    realized = float(fields.lesion_mask.sum() / tissue_px) if tissue_px else 0.0
    return SlideTruth(
        path=path, width=width, height=height, mpp=mpp, level_dimensions=dims,
        requested_lesion_fraction=float(lesion_fraction), lesion_fraction=realized,
        lesion_mask=fields.lesion_mask, tissue_mask=fields.tissue_mask, pen_mask=fields.pen > 0.5,
    )


def write_masks(truth: SlideTruth) -> tuple[Path, Path]:
    """Write <slide>_lesion.png and <slide>_tissue.png (0/255, 1 px = MASK_DOWNSAMPLE level-0 px)."""
    return tuple(
        write_mask(mask_path(truth.path, kind), mask, truth.mask_downsample, slide_size=f"{truth.width}x{truth.height}")
        for kind, mask in (("lesion", truth.lesion_mask), ("tissue", truth.tissue_mask))
    )


def read_lesion_mask(path) -> np.ndarray:
    """Lesion mask (bool, 1 px = MASK_DOWNSAMPLE level-0 px) of a slide or its _lesion.png."""
    return read_mask(path, "lesion")


def read_tissue_mask(path) -> np.ndarray:
    """Tissue mask (bool, same grid as the lesion mask) of a slide or its _tissue.png."""
    return read_mask(path, "tissue")


def cohort_assignment(n_slides: int, positive_fraction: float, seed: int) -> np.ndarray:
    """Which slides are positive: exactly round(n * fraction), chosen from the seed."""
    n_pos = int(round(n_slides * positive_fraction))
    labels = np.zeros(n_slides, int)
    labels[np.random.default_rng([seed, 2718]).permutation(n_slides)[:n_pos]] = 1
    return labels


def write_cohort(out_dir, spec: CohortSpec, progress: bool = False):
    """Write OUT_DIR/synth_NNN.tif, their masks, labels.csv and synth.json; return the labels."""
    import pandas as pd
    from tqdm import tqdm

    if spec.n_slides < 1:
        raise NicError(f"{out_dir}: --slides must be at least 1")
    if not 0 <= spec.positive_fraction <= 1:
        raise NicError(f"{out_dir}: --positive-fraction must be in [0, 1]")
    if spec.positive_fraction > 0 and not 0 < spec.lesion_fraction < 1:
        raise NicError(f"{out_dir}: --lesion-fraction must be in (0, 1) for positive slides")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = cohort_assignment(spec.n_slides, spec.positive_fraction, spec.seed)
    rows, details = [], []
    digits = max(3, len(str(spec.n_slides - 1)))
    for i in tqdm(range(spec.n_slides), unit="slide", disable=not progress):
        slide_id = f"synth_{i:0{digits}d}"
        slide_seed = int(np.random.SeedSequence([spec.seed, i]).generate_state(1)[0])
        truth = write_synthetic_slide(
            out_dir / f"{slide_id}.tif", spec.width, spec.height, spec.mpp, slide_seed,
            spec.lesion_fraction if labels[i] else 0.0, spec.texture, spec.pen_marks,
            tile_labels=spec.tile_labels, lesion_classes=spec.lesion_classes, tile_mpp=spec.tile_mpp,
            artifacts=spec.artifacts, jpeg_quality=spec.jpeg_quality, progress=progress,
            workers=spec.workers,
        )
        write_masks(truth)
        rows.append({"slide_id": slide_id, "label": truth.label, "lesion_fraction": truth.lesion_fraction})
        details.append({"slide_id": slide_id, "seed": slide_seed, "tissue_px": int(truth.tissue_mask.sum()),
                        "lesion_px": int(truth.lesion_mask.sum())})
    table = pd.DataFrame(rows, columns=["slide_id", "label", "lesion_fraction"])
    table.to_csv(out_dir / "labels.csv", index=False)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()}
    (out_dir / "synth.json").write_text(json.dumps(
        {"spec": meta, "mask_downsample": MASK_DOWNSAMPLE, "slides": details}, indent=2))
    return table
