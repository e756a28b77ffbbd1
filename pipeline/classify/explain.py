"""Explanations of slide-level models, drawn over the slide and its compressed tensor.

For each slide: a relevance map on the compressed grid, as the model explains itself (Grad-CAM
for nic-cnn, attention for abmil, per-cell contribution of the linear head for mean/max; see
SlideModel.explain), drawn over the slide thumbnail when the slide file is given, beside the
PCA-RGB view of the codes (:mod:`pipeline.viz`). Where a lesion mask exists (synthetic cohorts),
the AUC of the relevance values against the lesion cells is reported: how well the explanation
finds the lesion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.classify.bundle import SlideModel, check_store_matches
from pipeline.classify.metrics import auc
from pipeline.classify.source import SlideSource, list_store_slides
from pipeline.compress.grid import cell_coverage
from pipeline.errors import NicError
from pipeline.io import find_slides, open_slide
from pipeline.io.masks import mask_downsample, read_mask
from pipeline.viz.heatmap import render
from pipeline.viz.pca import pca_rgb


def _cell_step(coords: np.ndarray, attrs: dict) -> float:
    """µm between cell centres along one axis (from the coordinates, else the store attrs)."""
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
    valid = np.isfinite(heat)
    return auc(lesion_fraction[valid] >= threshold, heat[valid])


def _find_slide(slides_dir, slide_id):
    if slides_dir is None:
        return None
    for path in find_slides([Path(slides_dir)]):
        if Path(path).stem == slide_id or Path(path).name.split(".")[0] == slide_id:
            return Path(path)
    return None


def _slide_view(path, meta):
    """(thumbnail, (height_um, width_um)) of the slide file, or (None, None)."""
    if path is None:
        return None, None
    with open_slide(path) as slide:
        mpp = slide.mpp or meta["attrs"].get("slide_mpp")
        width, height = slide.dimensions
        thumb = slide.thumbnail()
    return thumb, ((height * mpp, width * mpp) if mpp else None)


def _grid_extent(meta: dict) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) in µm of the grid's cells, for imshow."""
    step_y, step_x = _cell_step(meta["y"], meta["attrs"]), _cell_step(meta["x"], meta["attrs"])
    return (meta["x"][0] - step_x / 2, meta["x"][-1] + step_x / 2,
            meta["y"][-1] + step_y / 2, meta["y"][0] - step_y / 2)


def explain_cohort(store, run_dir, out_dir, slides_dir=None, masks_dir=None, slide_ids=None) -> pd.DataFrame:
    """Write a heatmap PNG per slide to ``out_dir`` and heatmaps.csv / heatmaps.json.

    Lesion masks ``<slide_id>_lesion.png`` are looked up in ``masks_dir`` (default:
    ``slides_dir``); where found, the heatmap AUC against lesion cells is reported.
    """
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
        render(out_dir / f"{sid}.png", heat, rgb, _grid_extent(meta), thumbnail, extent_um, lesion,
               (meta["x"], meta["y"]), title)
        rows.append(row)
        source.clear()  # one slide at a time
    frame = pd.DataFrame(rows)
    frame.to_csv(out_dir / "heatmaps.csv", index=False)
    summary = {"model": bundle.name, "task": bundle.task, "method": bundle.entry.explanation, "n_slides": len(frame)}
    if "lesion_auc" in frame.columns:
        aucs = frame["lesion_auc"].dropna()
        summary.update(lesion_auc_mean=float(aucs.mean()) if len(aucs) else None,
                       lesion_auc_min=float(aucs.min()) if len(aucs) else None,
                       n_slides_with_lesion=int(len(aucs)))
    (out_dir / "heatmaps.json").write_text(json.dumps(summary, indent=2))
    return frame
