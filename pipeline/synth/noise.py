"""Noise that is a pure function of coordinates and a key: no state, no tile seams.

Integer hashes (splitmix64) give one uniform per lattice point; value noise and fBm interpolate
them; the cellular layers (ellipses on a jittered grid, Worley cells) gather per-cell hashes.
Every tile and pyramid level of a synthetic slide therefore sees the same texture.
"""

from __future__ import annotations

import numpy as np

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_PY = np.uint64(0x9E3779B97F4A7C15)
_PX = np.uint64(0xC2B2AE3D27D4EB4F)


def stream_key(seed: int, salt: int) -> np.uint64:
    """A 64-bit stream key from a seed and a salt (splitmix64 of both)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(salt) * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return np.uint64(z ^ (z >> 31))


def hash01(iy: np.ndarray, ix: np.ndarray, key: np.uint64) -> np.ndarray:
    """Uniform [0, 1) float32 per integer lattice point: a pure function of (iy, ix, key)."""
    with np.errstate(over="ignore"):
        h = (np.asarray(iy).astype(np.uint64) * _PY) ^ (np.asarray(ix).astype(np.uint64) * _PX) ^ key
        h = (h ^ (h >> np.uint64(30))) * _MIX1
        h = (h ^ (h >> np.uint64(27))) * _MIX2
        h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 2**24)


def interp_weights(coords: np.ndarray, smooth: bool) -> tuple[np.ndarray, int]:
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

    Lattice values come from :func:`hash01`, so the noise is a function of absolute
    coordinates only: tiles and pyramid levels agree, and nothing is precomputed.
    """
    wy, y0 = interp_weights(np.asarray(ys, np.float64) / spacing, smooth=True)
    wx, x0 = interp_weights(np.asarray(xs, np.float64) / spacing, smooth=True)
    iy = np.arange(y0, y0 + wy.shape[1])[:, None]
    ix = np.arange(x0, x0 + wx.shape[1])[None, :]
    lattice = hash01(iy, ix, key) * 2 - 1
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


def smoothstep(x):
    """0 below 0, 1 above 1, a smooth cubic ramp between."""
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


def blob_layer(yw, xw, cell_um, key, radius_um, elong, presence, edge_um, dark_range=(0.85, 1.15)):
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
    u = [hash01(gi, gj, key + np.uint64(s)).ravel() for s in range(7)]
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


def voronoi(yw, xw, cell_um, key):
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
    py = ((gi + 0.1 + 0.8 * hash01(gi, gj, key)) * cell_um).astype(np.float32).ravel()
    px = ((gj + 0.1 + 0.8 * hash01(gi, gj, key + np.uint64(1))) * cell_um).astype(np.float32).ravel()
    pu = hash01(gi, gj, key + np.uint64(2)).ravel()
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
