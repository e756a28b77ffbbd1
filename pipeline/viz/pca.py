"""PCA-RGB: the first three principal components of a slide's codes as red, green and blue.

Regions the encoder sees alike get alike colours, so a glance tells whether the compression
kept the tissue's structure (tumour, stroma, fat apart) and where it encoded.
"""

from __future__ import annotations

from pipeline.runtime.arrays import array_namespace


def pca_rgb(features, tissue, background: str = "white", percentiles=(1.0, 99.0)):
    """RGB view of a compressed tensor: PCA of the codes over tissue cells to 3 components.

    features (C, ny, nx), tissue (ny, nx) fraction; returns uint8 (ny, nx, 3) in the input's
    array namespace. Each component is scaled to 0..255 between its 1st and 99th percentile;
    signs are fixed (largest loading positive) so the colours are reproducible. Cells without
    tissue codes are white (``background="white"``) or black.
    """
    xp = array_namespace(features)
    feats = xp.asarray(features, dtype=xp.float32)
    if feats.ndim != 3:
        raise ValueError(f"features must be (C, y, x), got shape {feats.shape}")
    valid = (xp.asarray(tissue) > 0) & xp.any(feats != 0, axis=0)
    _, ny, nx = feats.shape
    out = xp.full((ny, nx, 3), 255 if background == "white" else 0, dtype=xp.uint8)
    n = int(valid.sum())
    if n == 0:
        return out
    codes = feats[:, valid].T.astype(xp.float64)
    codes = codes - codes.mean(axis=0)
    cov = codes.T @ codes / max(n - 1, 1)
    _, vectors = xp.linalg.eigh(cov)
    components = vectors[:, ::-1][:, :3]
    k = components.shape[1]
    pick = xp.argmax(xp.abs(components), axis=0)
    signs = xp.sign(components[pick, xp.arange(k)])
    signs = xp.where(signs == 0, 1.0, signs)
    projected = codes @ (components * signs)
    if k < 3:
        projected = xp.concatenate([projected, xp.zeros((n, 3 - k))], axis=1)
    lo = xp.percentile(projected, percentiles[0], axis=0)
    hi = xp.percentile(projected, percentiles[1], axis=0)
    scaled = xp.clip((projected - lo) / xp.maximum(hi - lo, 1e-12), 0.0, 1.0)
    out[valid] = (scaled * 255 + 0.5).astype(xp.uint8)
    return out
