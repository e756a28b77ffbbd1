"""Macenko stain augmentation: jitter each patch's own H and E concentrations (NumPy, seeded).

Macenko et al. (ISBI 2009) estimate a patch's two stain optical-density (OD) vectors from the
angular extremes of its tissue pixels' OD in the plane of the two largest eigenvectors. The
augmentation follows torchstain's ``MacenkoAugmentor`` (Barbano et al., 2022): the per-pixel
concentrations ``C`` of the two stains (least squares on those vectors) become
``C * U(1 - s1, 1 + s1) + U(-s2, s2)``, drawn per stain. Unlike torchstain, the image is rebuilt
as ``OD + HE @ (C' - C)``: what the two stains do not explain (residual OD) is kept, so an
identity draw returns the patch unchanged. Patches with too little tissue to fit the vectors
(blank glass) use torchstain's reference H&E vectors.
"""

from __future__ import annotations

import numpy as np

from nic_pipeline.compress.stain import macenko_vectors

# torchstain's reference H and E OD vectors (columns), used where a patch has too little tissue
HE_REFERENCE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Beer-Lambert OD ``-log(I / 255)`` of uint8 or [0, 255] float RGB, pixels as rows ``(N, 3)``."""
    return -np.log(np.clip(rgb.reshape(-1, 3).astype(np.float64), 1.0, 255.0) / 255.0)


def stain_vectors(od: np.ndarray, beta: float = 0.15, alpha: float = 1.0, min_pixels: int = 64) -> np.ndarray:
    """The ``(3, 2)`` H and E OD vectors (columns, H first) of a patch by Macenko's method
    (:func:`nic_pipeline.compress.stain.macenko_vectors`, shared with stain normalisation).

    Pixels with OD below ``beta`` in any channel are background; ``alpha`` is the percentile of
    the angle taken as each extreme. Too few tissue pixels, or one stain only: :data:`HE_REFERENCE`.
    """
    found = macenko_vectors(od, beta, alpha, min_pixels)
    return HE_REFERENCE if found is None else found.T


def macenko_augment(x: np.ndarray, rng: np.random.Generator, sigma_scale: float = 0.2,
                    sigma_shift: float = 0.2) -> np.ndarray:
    """Macenko stain jitter of an RGB patch in [0, 1] (float in, float32 out, same shape)."""
    od = optical_density(x * 255.0)
    he = stain_vectors(od)
    conc = np.linalg.pinv(he) @ od.T  # least-squares concentrations (2, N)
    scale = rng.uniform(1 - sigma_scale, 1 + sigma_scale, size=(2, 1))
    shift = rng.uniform(-sigma_shift, sigma_shift, size=(2, 1))
    new_od = od + (he @ (conc * (scale - 1) + shift)).T
    return np.clip(np.exp(-new_od), 0, 1).reshape(x.shape).astype(np.float32)
