"""Stain normalisation of H&E images: Macenko (ISBI 2009) and Reinhard (2001), for NumPy and CuPy.

A stain is a few numbers (:class:`Stain`): for Macenko, the haematoxylin and eosin
optical-density unit vectors and their 99th-percentile concentrations; for Reinhard, the mean
and standard deviation of CIE L*a*b* over tissue. A slide's own stain is fitted once, on its
tissue at a low resolution, and every patch of the slide is then mapped from it onto a target
stain: one transform per slide, so neighbouring patches stay consistent. An image with too
little tissue to fit gets no stain (None), and normalising it leaves it as it is (never NaN).

Written once for NumPy and CuPy: the namespace comes from the input (``array_namespace``) and
the colour conversions from skimage.color or cucim.skimage.color (:mod:`nic_pipeline.runtime.arrays`).
Method, parameters and measurements: docs/compress.md, "Stain normalisation".
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from nic_pipeline.compress.tissue import MIN_OD, optical_density
from nic_pipeline.runtime.arrays import array_namespace, skimage, to_numpy

METHODS = ("macenko", "reinhard")
MACENKO_BETA = 0.15  # Macenko's beta: pixels with OD below this in any channel are too clear to unmix
MACENKO_ALPHA = 1.0  # Macenko's alpha: the stain vectors are at the (alpha, 100 - alpha) angle percentiles
MAX_CONC_PERCENTILE = 99.0  # a stain's "maximum" concentration: robust to a few dark specks
MIN_STAIN_ANGLE = float(np.deg2rad(2.0))  # extreme vectors closer than this: one stain only, no fit
MIN_FIT_PIXELS = 256  # fewer usable pixels than this: no fit
FIT_PIXELS = 1 << 20  # a fit uses at most this many pixels (an even subsample of larger images)
GLASS_RAMP_OD = 2 * MIN_OD  # Reinhard: pixels clearer than this blend back to their own colour
DECIMALS = 5  # fitted numbers are rounded: the same on CPU and GPU workers, and on every rerun
_SIZES = {"macenko": 8, "reinhard": 6}


@dataclass(frozen=True)
class Stain:
    """The stain of an image, a slide or a cohort: small numbers that travel in the compress config.

    ``values``: Macenko, the H and E OD unit vectors (RGB, 3 each) then their maximum
    concentrations (2); Reinhard, the L*a*b* means (3) then standard deviations (3).
    """

    method: str
    values: tuple[float, ...]

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown stain method {self.method!r}; one of {', '.join(METHODS)}")
        if len(self.values) != _SIZES[self.method]:
            raise ValueError(f"a {self.method} stain has {_SIZES[self.method]} numbers, not {len(self.values)}")

    @classmethod
    def of(cls, method: str, values) -> Stain | None:
        """A stain from computed numbers (any namespace), rounded; None when any is not finite."""
        values = np.asarray(to_numpy(values), np.float64).ravel()
        if not np.isfinite(values).all():
            return None
        return cls(method, tuple(round(float(v), DECIMALS) for v in values))

    @property
    def stains(self) -> np.ndarray:
        """Macenko: (2, 3) rows H and E, OD per unit concentration in R, G, B."""
        return np.asarray(self.values[:6], np.float64).reshape(2, 3)

    @property
    def max_conc(self) -> np.ndarray:
        """Macenko: the 99th-percentile concentrations of H and E."""
        return np.asarray(self.values[6:8], np.float64)

    @property
    def lab_mean(self) -> np.ndarray:
        return np.asarray(self.values[:3], np.float64)

    @property
    def lab_std(self) -> np.ndarray:
        return np.asarray(self.values[3:6], np.float64)


# --- fitting --------------------------------------------------------------------------------------


def fit_stain(method: str, rgb, mask=None) -> Stain | None:
    """The ``method`` stain of a uint8 RGB image (any leading shape), on the pixels of ``mask``
    (bool, the image's leading shape; default: all) that are not glass; None with too little tissue."""
    if method not in METHODS:
        raise ValueError(f"unknown stain method {method!r}; one of {', '.join(METHODS)}")
    pixels = _tissue_pixels(rgb, mask)
    if len(pixels) < MIN_FIT_PIXELS:
        return None
    return fit_macenko(pixels) if method == "macenko" else fit_reinhard(pixels)


def _tissue_pixels(rgb, mask=None):
    """(n, 3) uint8: the pixels of ``mask`` clearer than glass, evenly thinned to FIT_PIXELS."""
    xp = array_namespace(rgb)
    pixels = rgb[..., :3].reshape(-1, 3)
    keep = optical_density(pixels).mean(axis=-1) >= MIN_OD
    if mask is not None:
        keep &= xp.asarray(mask).reshape(-1)
    pixels = pixels[keep]
    step = -(-len(pixels) // FIT_PIXELS)
    return pixels[::step] if step > 1 else pixels


def fit_macenko(pixels) -> Stain | None:
    """Macenko et al. (2009) on (n, 3) uint8 tissue pixels: OD, drop pixels with OD < beta in any
    channel, project onto the plane of the two largest eigenvectors of the OD covariance, take the
    directions at the alpha and 100 - alpha percentiles of the angle as the stain vectors (the
    one absorbing more red is haematoxylin), and the 99th percentiles of the concentrations."""
    xp = array_namespace(pixels)
    od = optical_density(pixels).astype(xp.float64)
    stains = macenko_vectors(od)
    if stains is None:
        return None
    conc = od @ xp.linalg.pinv(stains)
    max_conc = xp.percentile(conc, MAX_CONC_PERCENTILE, axis=0)
    if float(max_conc.min()) <= 0:
        return None
    return Stain.of("macenko", xp.concatenate([stains.ravel(), max_conc]))


def macenko_vectors(od, beta: float = MACENKO_BETA, alpha: float = MACENKO_ALPHA, min_pixels: int = MIN_FIT_PIXELS):
    """Macenko's H and E unit OD vectors, (2, 3) rows H then E, of (n, 3) optical densities; None
    with fewer than ``min_pixels`` pixels above ``beta`` in every channel, or a single stain.
    Shared by normalisation (per slide) and stain augmentation (per patch, nic_pipeline.encoder.macenko)."""
    xp = array_namespace(od)
    clear = od[xp.all(od >= beta, axis=1)]
    if len(clear) < min_pixels:
        return None
    _, vectors = xp.linalg.eigh(xp.cov(clear.T))
    plane = vectors[:, [2, 1]]  # largest eigenvalue first (eigh sorts ascending)
    plane = plane * xp.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    projected = clear @ plane
    angle = xp.arctan2(projected[:, 1], projected[:, 0])
    low, high = (float(a) for a in xp.percentile(angle, xp.asarray([alpha, 100 - alpha])))
    if high - low < MIN_STAIN_ANGLE:
        return None
    ends = [plane @ xp.asarray([np.cos(a), np.sin(a)]) for a in (low, high)]
    return xp.stack(ends if float(ends[0][0]) >= float(ends[1][0]) else ends[::-1])  # H: more red absorbed


def fit_reinhard(pixels) -> Stain | None:
    """Reinhard et al. (2001) on (n, 3) uint8 tissue pixels: mean and standard deviation of each
    CIE L*a*b* channel (the perceptual space of the paper's lαβ, through a kept conversion)."""
    xp = array_namespace(pixels)
    lab = skimage(xp, "color").rgb2lab(pixels)
    return Stain.of("reinhard", xp.concatenate([lab.mean(axis=0), xp.maximum(lab.std(axis=0), 1e-3)]))


def median_stain(stains: list[Stain]) -> Stain:
    """The median of several stains of one method, number by number (a cohort's target); Macenko's
    vectors are made unit length again."""
    values = np.median([s.values for s in stains], axis=0)
    if stains[0].method == "macenko":
        vectors = values[:6].reshape(2, 3)
        values[:6] = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).ravel()
    return Stain.of(stains[0].method, values)


# --- normalising ----------------------------------------------------------------------------------


def normalise(rgb, source: Stain | None, target: Stain):
    """uint8 RGB (any leading shape, NumPy or CuPy) with its stain moved from ``source`` onto
    ``target``; as it is when ``source`` is None (too little tissue was there to fit it)."""
    if source is None:
        return rgb
    if source.method != target.method:
        raise ValueError(f"a {source.method} source stain cannot be normalised onto a {target.method} target")
    return macenko_normalise(rgb, source, target) if source.method == "macenko" else reinhard_normalise(
        rgb, source, target)


def normaliser(method: str, target, source):
    """The function applied to every band of patches of one slide: ``normalise`` with the slide's
    ``source`` and the run's ``target`` numbers, or the identity when ``method`` is "none"."""
    if method == "none":
        return _identity
    return functools.partial(normalise, source=None if source is None else Stain(method, tuple(source)),
                             target=Stain(method, tuple(target)))


def _identity(rgb):
    return rgb


def macenko_matrix(source: Stain, target: Stain) -> np.ndarray:
    """(3, 3) map of OD row vectors: unmix into H and E with the source vectors, scale each
    concentration by target / source maximum, mix with the target vectors (the residual drops)."""
    scale = np.diag(target.max_conc / source.max_conc)
    return np.linalg.pinv(source.stains) @ scale @ target.stains


def macenko_normalise(rgb, source: Stain, target: Stain):
    """Macenko normalisation: one linear map in optical density, so white stays white."""
    xp = array_namespace(rgb)
    od = optical_density(rgb) @ xp.asarray(macenko_matrix(source, target), dtype=xp.float32)
    return _to_uint8(256.0 * xp.exp(-od) - 1.0)


def reinhard_normalise(rgb, source: Stain, target: Stain):
    """Reinhard normalisation: each L*a*b* channel shifted and scaled from the source's mean and
    standard deviation to the target's. Glass keeps its colour (blended in below GLASS_RAMP_OD
    mean OD, as HistomicsTK's ``mask_out``), so that a slide's tint does not colour its background."""
    xp = array_namespace(rgb)
    color = skimage(xp, "color")
    rgb = rgb[..., :3]
    lab = color.rgb2lab(rgb.astype(xp.float32) / 255.0)  # float32 all through: 2-3x faster than uint8 input
    gain = xp.asarray(target.lab_std / source.lab_std, dtype=xp.float32)
    lab = (lab - xp.asarray(source.lab_mean, dtype=xp.float32)) * gain + xp.asarray(target.lab_mean, dtype=xp.float32)
    with warnings.catch_warnings():  # out-of-gamut colours are clipped, as they should be
        warnings.filterwarnings("ignore", message=".*negative Z values.*")
        moved = color.lab2rgb(lab) * 255.0
    weight = xp.clip(optical_density(rgb).mean(axis=-1, keepdims=True) / GLASS_RAMP_OD, 0.0, 1.0)
    return _to_uint8(rgb + weight * (moved - rgb))


def _to_uint8(values):
    xp = array_namespace(values)
    return xp.clip(xp.rint(values), 0, 255).astype(xp.uint8)
