"""Stains: the H and E optical-density vectors, and per-slide stain jitter (``--stain-jitter``).

Colour follows Beer-Lambert: optical density ``OD = -log(RGB / 255)`` is a sum of stain
concentrations times their OD vectors. A slide's jitter scales each RGB component of its H and E
vectors by ``U(1 - s, 1 + s)``, drawn from the slide seed on a stream of its own, so slides of one
cohort differ in stain as between labs or batches, and ``s = 0`` leaves every slide as it was.
Procedural texture uses the jittered vectors directly; real tiles are unmixed into H, E and
residual with scikit-image's HED matrix and mixed back with the jittered vectors.
"""

from __future__ import annotations

import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

# Stain optical-density vectors (rows: R, G, B absorbance per unit concentration).
HEMATOXYLIN = np.array([0.651, 0.701, 0.290], np.float32)
EOSIN = np.array([0.216, 0.801, 0.558], np.float32)


def stain_scales(seed: int, jitter: float) -> np.ndarray:
    """(2, 3) factors for the RGB components of the H (row 0) and E (row 1) vectors of one slide."""
    if jitter == 0:
        return np.ones((2, 3), np.float32)
    rng = np.random.default_rng([seed, 6007])
    return rng.uniform(1 - jitter, 1 + jitter, (2, 3)).astype(np.float32)


def restain_matrix(scales: np.ndarray) -> np.ndarray:
    """(3, 3) map of OD row vectors: unmix into H, E, residual, then mix with the scaled H and E."""
    target = rgb_from_hed.copy()
    target[:2] *= scales
    return (hed_from_rgb @ target).astype(np.float32)


def restain(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Float RGB (..., 3) in 0..255 with its stains remixed by :func:`restain_matrix`."""
    od = -np.log(np.clip(rgb, 1.0, 255.0) / np.float32(255.0))
    return np.float32(255.0) * np.exp(-(od @ matrix))
