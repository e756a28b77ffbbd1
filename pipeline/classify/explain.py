"""Explanations of slide-level models, drawn over the slide and its compressed tensor.

For each slide: a relevance map on the compressed grid (Grad-CAM for nic-cnn, attention for
abmil, per-cell contribution of the linear head for mean/max; see SlideModel.explain), drawn
over the slide thumbnail when the slide file is given, beside the PCA-RGB view of the codes
(:func:`pca_rgb`). Where a lesion mask exists (synthetic cohorts), the AUC of the relevance
values against the lesion cells is reported: how well the explanation finds the lesion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.compress.grid import cell_coverage
from pipeline.io.masks import mask_downsample, read_mask
from pipeline.runtime.arrays import array_namespace
from pipeline.errors import NicError


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


def _cell_step(coords: np.ndarray, attrs: dict) -> float:
    if len(coords) > 1:
        return float(np.median(np.diff(coords)))
    return float(attrs.get("stride", attrs.get("patch_size", 1)) * attrs.get("mpp", 1.0))


def mask_um_per_px(mask_shape, meta: dict, slide_extent_um=None, downsample: int | None = None) -> tuple[float, float]:
    """(y, x) µm per pixel of a lesion mask covering the whole slide.

    A mask that records its downsample (``nic synth`` masks do) is scaled by the store's
    ``slide_mpp``; otherwise the slide's extent is used when known (slide file given), else the
    mask is taken to cover the grid's extent.
    """
    slide_mpp = meta["attrs"].get("slide_mpp")
    if downsample and slide_mpp:
        return (float(downsample * slide_mpp),) * 2
    if slide_extent_um is not None:
        return slide_extent_um[0] / mask_shape[0], slide_extent_um[1] / mask_shape[1]
    _, ny, nx = meta["shape"]
    return (ny * _cell_step(meta["y"], meta["attrs"]) / mask_shape[0],
            nx * _cell_step(meta["x"], meta["attrs"]) / mask_shape[1])


def mask_to_grid(mask: np.ndarray, meta: dict, um_per_px: tuple[float, float]) -> np.ndarray:
    """Fraction (ny, nx) of each grid cell covered by a full-slide ``mask``."""
    _, ny, nx = meta["shape"]
    return cell_coverage(np.asarray(mask), um_per_px, _cell_step(meta["y"], meta["attrs"]), (ny, nx))


def heatmap_auc(heat: np.ndarray, lesion_fraction: np.ndarray, threshold: float = 0.5) -> float:
    """AUC of relevance values against lesion cells (fraction >= threshold) over tissue cells
    (finite heat values); NaN when the slide has no lesion or no normal cell."""
    from pipeline.classify.metrics import auc

    valid = np.isfinite(heat)
    return auc(lesion_fraction[valid] >= threshold, heat[valid])


def _find_slide(slides_dir, slide_id):
    if slides_dir is None:
        return None
    from pipeline.io import find_slides

    for path in find_slides([Path(slides_dir)]):
        if Path(path).stem == slide_id or Path(path).name.split(".")[0] == slide_id:
            return Path(path)
    return None


def _slide_view(path, meta):
    """(thumbnail, (height_um, width_um)) of the slide file, or (None, None)."""
    if path is None:
        return None, None
    from pipeline.io import open_slide

    with open_slide(path) as slide:
        mpp = slide.mpp or meta["attrs"].get("slide_mpp")
        width, height = slide.dimensions
        thumb = slide.thumbnail()
    return thumb, ((height * mpp, width * mpp) if mpp else None)


def render(path, heat, rgb, meta, thumbnail=None, extent_um=None, lesion=None, title=""):
    """Write the PNG: relevance over the thumbnail (or alone) | PCA-RGB of the codes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    attrs = meta["attrs"]
    step_y, step_x = _cell_step(meta["y"], attrs), _cell_step(meta["x"], attrs)
    extent = (meta["x"][0] - step_x / 2, meta["x"][-1] + step_x / 2,
              meta["y"][-1] + step_y / 2, meta["y"][0] - step_y / 2)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=100)
    ax = axes[0]
    if thumbnail is not None and extent_um is not None:
        ax.imshow(thumbnail, extent=(0, extent_um[1], extent_um[0], 0))
        ax.imshow(np.ma.masked_invalid(heat), cmap="jet", alpha=0.45, extent=extent, interpolation="nearest")
    else:
        ax.imshow(np.ma.masked_invalid(heat), cmap="jet", extent=extent, interpolation="nearest")
    if lesion is not None and lesion.max() >= 0.5:
        ax.contour(meta["x"], meta["y"], lesion, levels=[0.5], colors="white", linewidths=1)
    ax.set_title("relevance" + (" (lesion outlined)" if lesion is not None else ""), fontsize=9)
    axes[1].imshow(rgb, extent=extent, interpolation="nearest")
    axes[1].set_title("compressed tensor, PCA to RGB", fontsize=9)
    for ax in axes:
        ax.set_xlabel("µm")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def explain_cohort(store, run_dir, out_dir, slides_dir=None, masks_dir=None, slide_ids=None) -> pd.DataFrame:
    """Write a heatmap PNG per slide to ``out_dir`` and heatmaps.csv / heatmaps.json.

    Lesion masks ``<slide_id>_lesion.png`` are looked up in ``masks_dir`` (default:
    ``slides_dir``); where found, the heatmap AUC against lesion cells is reported.
    """
    from pipeline.classify import SlideModel, SlideSource, check_store_matches, list_store_slides

    bundle = SlideModel.load(run_dir)
    source = SlideSource(store, bundle.config["params"].get("cache_mb", 1024))
    slide_ids = list(slide_ids) if slide_ids is not None else list_store_slides(store)
    if not slide_ids:
        raise NicError(f"{store}: no complete slides to explain")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    masks_dir = Path(masks_dir) if masks_dir is not None else (Path(slides_dir) if slides_dir else None)
    rows = []
    for sid in slide_ids:
        check_store_matches(bundle, source, sid)
        meta = source.meta(sid)
        scores = bundle.raw_scores(source, sid)
        prediction = bundle.predict_row(source, sid, scores)
        heat = bundle.explain(source, sid, scores)
        rgb = pca_rgb(source.features(sid), source.tissue(sid))
        thumbnail, extent_um = _slide_view(_find_slide(slides_dir, sid), meta)
        mask_path = masks_dir / f"{sid}_lesion.png" if masks_dir is not None else None
        lesion = None
        if mask_path is not None and mask_path.exists():
            mask = read_mask(mask_path)
            scale = mask_um_per_px(mask.shape, meta, extent_um, mask_downsample(mask_path))
            lesion = mask_to_grid(mask, meta, scale)
        row = {"slide_id": sid, **prediction, "n_tissue_cells": int(np.isfinite(heat).sum())}
        if lesion is not None:
            row["n_lesion_cells"] = int(((lesion >= 0.5) & np.isfinite(heat)).sum())
            row["lesion_auc"] = heatmap_auc(heat, lesion)
        score = prediction.get("score", prediction.get("pred"))
        title = f"{sid} — {bundle.name}, score {score:.3f}" if isinstance(score, float) else f"{sid} — {bundle.name}, {score}"
        render(out_dir / f"{sid}.png", heat, rgb, meta, thumbnail, extent_um, lesion, title)
        rows.append(row)
        source._cache.clear()  # one slide at a time
        source._cached_bytes = 0
    frame = pd.DataFrame(rows)
    frame.to_csv(out_dir / "heatmaps.csv", index=False)
    summary = {"model": bundle.name, "task": bundle.task, "method": _method(bundle.name), "n_slides": len(frame)}
    if "lesion_auc" in frame.columns:
        aucs = frame["lesion_auc"].dropna()
        summary.update(lesion_auc_mean=float(aucs.mean()) if len(aucs) else None,
                       lesion_auc_min=float(aucs.min()) if len(aucs) else None,
                       n_slides_with_lesion=int(len(aucs)))
    (out_dir / "heatmaps.json").write_text(json.dumps(summary, indent=2))
    return frame


def _method(model: str) -> str:
    return {"nic-cnn": "grad-cam", "abmil": "attention"}.get(model, "linear contribution per cell")
