"""Low-frequency slide content on the mask grid: tissue sections, lesions, fat, lymphoid
aggregates, stain drift, pen marks and folds, one value per ``MASK_DOWNSAMPLE`` level-0 px.

Everything is drawn from the slide's seed. The lesion area is exact on this grid: the lesion
mask holds ``round(fraction * tissue px)`` pixels. The renderer samples these fields
bilinearly at pixel resolution (:func:`sample_fields`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.draw import line

from nic_pipeline.synth.noise import fbm, interp_weights, smoothstep, stream_key, value_noise

MASK_DOWNSAMPLE = 32          # level-0 px per mask px (16 µm at 0.5 µm/px)

# Pen ink optical-density vectors (R, G, B absorbance per unit concentration).
_PEN_OD = {
    "green": np.array([0.95, 0.30, 0.75], np.float32),
    "blue": np.array([0.95, 0.55, 0.12], np.float32),
    "red": np.array([0.10, 0.95, 0.70], np.float32),
}


def mask_shape(width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of the mask grid of a width x height slide (ceil division)."""
    return -(-height // MASK_DOWNSAMPLE), -(-width // MASK_DOWNSAMPLE)


def _signed_distance(f: np.ndarray, step_um: float) -> np.ndarray:
    """First-order signed distance (µm) to the zero level set of a smooth field f."""
    gy, gx = np.gradient(f.astype(np.float32), step_um)
    grad = np.sqrt(gy * gy + gx * gx)
    return np.clip(f / np.maximum(grad, 1e-6), -2000, 2000).astype(np.float32)


@dataclass
class Fields:
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
        """The fields the renderer samples, as one (7, rows, cols) array (order used by render)."""
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
                 pen_marks: bool = False, artifacts: bool = False) -> Fields:
    """All low-frequency content of one slide, on the mask grid, from the seed."""
    rng = np.random.default_rng([seed, 7919])
    key = stream_key(seed, 1)
    gh, gw = mask_shape(width, height)
    step_um = MASK_DOWNSAMPLE * mpp
    gy_um = (np.arange(gh) + 0.5) * step_um
    gx_um = (np.arange(gw) + 0.5) * step_um
    tissue_f = _tissue_field(gy_um, gx_um, width * mpp, height * mpp, rng, key)
    tissue = tissue_f > 0
    lesion_f, lesion = _lesion_field(tissue, gy_um, gx_um, lesion_fraction, rng, key + np.uint64(500), step_um)
    fat = smoothstep((fbm(gy_um, gx_um, 700.0, key + np.uint64(600), octaves=2) - 0.25) * 5)
    fat *= ~lesion
    lymph = smoothstep((fbm(gy_um, gx_um, 320.0, key + np.uint64(700), octaves=3) - 0.45) * 6)
    lymph *= ~lesion
    stain = (1.0 + 0.12 * fbm(gy_um, gx_um, 2500.0, key + np.uint64(800), octaves=2)).astype(np.float32)
    pen = _pen_field((gh, gw), rng, step_um) if pen_marks else np.zeros((gh, gw), np.float32)
    pen_color = _PEN_OD[str(rng.choice(list(_PEN_OD)))]
    if artifacts:
        fold = smoothstep((np.abs(value_noise(gy_um, gx_um, 1500.0, key + np.uint64(900))) < 0.04) * 1.0)
        fold = (fold * (value_noise(gy_um, gx_um, 4000.0, key + np.uint64(901)) > 0.3)).astype(np.float32)
    else:
        fold = np.zeros((gh, gw), np.float32)
    return Fields(
        tissue_sd=_signed_distance(tissue_f, step_um),
        lesion_sd=_signed_distance(lesion_f, step_um) if lesion.any() else np.full((gh, gw), -2000, np.float32),
        fat=fat.astype(np.float32), lymph=lymph.astype(np.float32), stain=stain, pen=pen,
        pen_color=pen_color, fold=fold, tissue_mask=tissue, lesion_mask=lesion,
    )


def sample_fields(stack: np.ndarray, ys0: np.ndarray, xs0: np.ndarray) -> np.ndarray:
    """Bilinear samples (n_fields, len(ys0), len(xs0)) of the grid stack at level-0 px coords."""
    n, gh, gw = stack.shape
    gy = np.clip(ys0 / MASK_DOWNSAMPLE - 0.5, 0, gh - 1)
    gx = np.clip(xs0 / MASK_DOWNSAMPLE - 0.5, 0, gw - 1)
    wy, y0 = interp_weights(gy, smooth=False)
    wx, x0 = interp_weights(gx, smooth=False)
    crop = np.ascontiguousarray(stack[:, y0:y0 + wy.shape[1], x0:x0 + wx.shape[1]])
    wy = np.ascontiguousarray(wy[:, : crop.shape[1]])
    wxt = np.ascontiguousarray(wx[:, : crop.shape[2]].T)
    return (wy @ crop) @ wxt

