"""PCA-RGB: the first three principal components of the codes as red, green and blue.

Regions the encoder sees alike get alike colours, so a glance tells whether the compression
kept the tissue's structure (tumour, stroma, fat apart) and where it encoded. Colours compare
across slides only when every slide goes through the same projection: fit one :class:`PcaRgb`
on a sample of tissue cells of all slides (:func:`sample_codes`) and apply it to each slide.
:func:`pca_rgb` fits on one slide alone.

Array code takes its namespace from its input (NumPy or CuPy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nic_pipeline.runtime.arrays import array_namespace

EXACT_CHANNELS = 256
"""Codes up to this many channels get a full eigendecomposition; wider ones only the top three."""


def tissue_codes(features, tissue):
    """Codes (n, C) float64 of the cells that hold tissue codes, and that mask (ny, nx)."""
    xp = array_namespace(features)
    feats = xp.asarray(features, dtype=xp.float32)
    if feats.ndim != 3:
        raise ValueError(f"features must be (C, y, x), got shape {feats.shape}")
    valid = (xp.asarray(tissue) > 0) & xp.any(feats != 0, axis=0)
    return feats[:, valid].T.astype(xp.float64), valid


def sample_codes(features, tissue, n_max: int = 2000, seed: int = 0):
    """At most ``n_max`` tissue codes (n, C) of one slide, drawn without replacement."""
    xp = array_namespace(features)
    codes, _ = tissue_codes(features, tissue)
    if len(codes) <= n_max:
        return codes
    index = np.sort(np.random.default_rng(seed).permutation(len(codes))[:n_max])
    return codes[xp.asarray(index)]


@dataclass
class PcaRgb:
    """A projection of codes to RGB: centre, 3 signed components, per-component scaling range."""

    mean: object  # (C,)
    components: object  # (C, 3), zero columns when C < 3
    lo: object  # (3,)
    hi: object  # (3,)

    @classmethod
    def fit(cls, codes, percentiles=(1.0, 99.0)) -> "PcaRgb":
        """PCA of ``codes`` (n, C); each component is scaled between its 1st and 99th
        percentile; signs are fixed (largest loading positive) so colours are reproducible."""
        xp = array_namespace(codes)
        codes = xp.asarray(codes, dtype=xp.float64)
        n, c = codes.shape
        mean = codes.mean(axis=0) if n else xp.zeros(c)
        centred = codes - mean
        components = _top_components(xp, centred, 3)
        k = components.shape[1]
        pick = xp.argmax(xp.abs(components), axis=0)
        signs = xp.sign(components[pick, xp.arange(k)])
        components = components * xp.where(signs == 0, 1.0, signs)
        if k < 3:
            components = xp.concatenate([components, xp.zeros((c, 3 - k))], axis=1)
        projected = centred @ components if n else xp.zeros((1, 3))
        lo = xp.percentile(projected, percentiles[0], axis=0)
        hi = xp.percentile(projected, percentiles[1], axis=0)
        return cls(mean, components, lo, hi)

    def apply(self, features, tissue, background: str = "white"):
        """uint8 (ny, nx, 3) in the input's namespace; cells without tissue codes are white
        (``background="white"``) or black."""
        xp = array_namespace(features)
        codes, valid = tissue_codes(features, tissue)
        _, ny, nx = features.shape
        out = xp.full((ny, nx, 3), 255 if background == "white" else 0, dtype=xp.uint8)
        if len(codes) == 0:
            return out
        projected = (codes - xp.asarray(self.mean)) @ xp.asarray(self.components)
        lo, hi = xp.asarray(self.lo), xp.asarray(self.hi)
        scaled = xp.clip((projected - lo) / xp.maximum(hi - lo, 1e-12), 0.0, 1.0)
        scaled = xp.where(hi - lo > 1e-12, scaled, 0.0)  # a missing component stays dark
        out[valid] = (scaled * 255 + 0.5).astype(xp.uint8)
        return out


def _top_components(xp, centred, k: int):
    """The ``k`` leading principal directions (C, <=k) of centred codes (n, C), largest first.

    Foundation codes have 1,024-3,072 channels, where a full eigendecomposition of the C x C
    covariance takes tens of seconds on a CPU. Up to ``EXACT_CHANNELS`` channels (the NIC codes)
    it is done in full; above, with fewer cells than channels the n x n Gram matrix gives the same
    directions; otherwise (NumPy) Lanczos iteration (ARPACK, a fixed start) finds only the top k."""
    n, c = centred.shape
    if c <= EXACT_CHANNELS or (xp is not np and n >= c):
        return xp.linalg.eigh(centred.T @ centred)[1][:, ::-1][:, :k]
    if n < c:
        values, vectors = xp.linalg.eigh(centred @ centred.T)
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
        keep = values > values[0] * 1e-12 if len(values) else values > 0
        return (centred.T @ vectors[:, keep]) / xp.sqrt(values[keep])
    from scipy.sparse.linalg import LinearOperator, eigsh

    covariance = LinearOperator((c, c), matvec=lambda v: centred.T @ (centred @ v), dtype=np.float64)
    values, vectors = eigsh(covariance, k=k, which="LA", v0=np.ones(c), tol=1e-10)
    return vectors[:, np.argsort(values)[::-1]]


def pca_rgb(features, tissue, background: str = "white", percentiles=(1.0, 99.0)):
    """RGB view of one compressed tensor (C, ny, nx) with a PCA fitted on its own tissue cells;
    uint8 (ny, nx, 3). For colours comparable across slides, use one :class:`PcaRgb` per cohort."""
    codes, _ = tissue_codes(features, tissue)
    return PcaRgb.fit(codes, percentiles).apply(features, tissue, background)
