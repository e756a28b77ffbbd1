"""Explanations of slide-level models, drawn over the slide and its compressed tensor.

For each slide: a relevance map on the compressed grid, as the model explains itself (Grad-CAM
for nic-cnn, attention for abmil, per-cell contribution of the linear head for mean/max; see
SlideModel.explain), drawn over the slide thumbnail when the slide file is given, beside the
PCA-RGB view of the codes (:mod:`nic_pipeline.viz`). Where a lesion mask exists (synthetic cohorts),
the AUC of the relevance values against the lesion cells is reported: how well the explanation
finds the lesion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from nic_pipeline.classify.bundle import SlideModel, check_store_matches
from nic_pipeline.classify.labels import load_labels
from nic_pipeline.classify.metrics import auc
from nic_pipeline.classify.source import SlideSource, list_store_slides
from nic_pipeline.compress.grid import cell_coverage
from nic_pipeline.errors import NicError
from nic_pipeline.io import find_slides, open_slide
from nic_pipeline.io.masks import mask_downsample, read_mask
from nic_pipeline.viz.heatmap import HeatScale, render
from nic_pipeline.viz.pca import PcaRgb, sample_codes

THUMBNAIL_PX = 2048  # longer side of the slide thumbnail under a heatmap
PCA_CELLS, SCALE_CELLS = 2000, 5000  # cells per slide sampled for the cohort's PCA and colour scale


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
    """Fraction (ny, nx) of each grid cell's patch covered by a full-slide ``mask`` (the patch is
    larger than the cell step when the store was compressed with overlapping patches)."""
    _, ny, nx = meta["shape"]
    step = _cell_step(meta["y"], meta["attrs"])
    attrs = meta["attrs"]
    window = attrs["patch_size"] * attrs["mpp"] if {"patch_size", "mpp"} <= set(attrs) else None
    return cell_coverage(np.asarray(mask), um_per_px, step, (ny, nx), window)


def heatmap_auc(heat: np.ndarray, lesion_fraction: np.ndarray, threshold: float = 0.5) -> float:
    """AUC of relevance values against lesion cells (fraction >= threshold) over tissue cells
    (finite heat values); NaN when the slide has no lesion or no normal cell."""
    valid = np.isfinite(heat)
    return auc(lesion_fraction[valid] >= threshold, heat[valid])


def _slide_files(slides_dir) -> dict[str, Path]:
    """Slide files under ``slides_dir`` by slide id (name up to the first dot)."""
    if slides_dir is None:
        return {}
    return {Path(path).name.split(".")[0]: Path(path) for path in find_slides([Path(slides_dir)])}


def _slide_extent(path, meta) -> tuple[float, float] | None:
    """(height_um, width_um) of the slide file, or None."""
    if path is None:
        return None
    with open_slide(path) as slide:
        mpp = slide.mpp or meta["attrs"].get("slide_mpp")
        width, height = slide.dimensions
    return (height * mpp, width * mpp) if mpp else None


def _thumbnail(path):
    if path is None:
        return None
    with open_slide(path) as slide:
        return slide.thumbnail(THUMBNAIL_PX)


def _grid_extent(meta: dict) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) in µm of the grid's cells, for imshow."""
    step_y, step_x = _cell_step(meta["y"], meta["attrs"]), _cell_step(meta["x"], meta["attrs"])
    return (meta["x"][0] - step_x / 2, meta["x"][-1] + step_x / 2,
            meta["y"][-1] + step_y / 2, meta["y"][0] - step_y / 2)


def _lesion(masks_dir, slide_id, meta, extent_um):
    """Lesion fraction per cell (ny, nx) from ``<slide_id>_lesion.png``, or None."""
    path = masks_dir / f"{slide_id}_lesion.png" if masks_dir is not None else None
    if path is None or not path.exists():
        return None
    mask = read_mask(path)
    return mask_to_grid(mask, meta, mask_um_per_px(mask.shape, meta, extent_um, mask_downsample(path)))


class _Models:
    """The model that explains each slide: the model of the fold that held it out (out of fold),
    else the final model."""

    def __init__(self, run_dir, out_of_fold: bool):
        self.run_dir = Path(run_dir)
        self.final = SlideModel.load(run_dir)
        self.fold_of: dict[str, int] = {}
        if out_of_fold:
            oof = self.run_dir / "oof_predictions.csv"
            if not oof.exists():
                raise NicError(f"{run_dir}: no out-of-fold predictions (trained with --folds < 2)")
            table = pd.read_csv(oof, dtype={"slide_id": str})
            self.fold_of = dict(zip(table["slide_id"], table["fold"].astype(int)))
        self._folds: dict[int, SlideModel] = {}

    def for_slide(self, slide_id: str) -> tuple[SlideModel, str]:
        fold = self.fold_of.get(slide_id)
        if fold is None:
            return self.final, "final model"
        if fold not in self._folds:
            self._folds[fold] = SlideModel.load(self.run_dir / "folds" / f"fold-{fold}")
        return self._folds[fold], f"out of fold (fold {fold})"


def _true_labels(run_dir, labels, task: str) -> dict[str, str]:
    """Slide id -> the true label as text, from ``labels`` or the run's out-of-fold table."""
    if labels is not None:
        frame = load_labels(labels, task)
    elif (Path(run_dir) / "oof_predictions.csv").exists():
        frame = pd.read_csv(Path(run_dir) / "oof_predictions.csv", dtype={"slide_id": str, "label": str})
    else:
        return {}
    if task == "survival" and {"time", "event"} <= set(frame.columns):
        return {s: f"time {t:g}, event {int(e)}" for s, t, e in zip(frame["slide_id"], frame["time"], frame["event"])}
    if "label" not in frame.columns:
        return {}
    return dict(zip(frame["slide_id"].astype(str), frame["label"].astype(str)))


def score_text(bundle: SlideModel, prediction: dict) -> str:
    """The prediction named as what it is: P(<positive class>), predicted class, value or risk."""
    task = bundle.task
    if task == "binary":
        positive = bundle.config["target"]["classes"][1]
        name = f"positive, label {positive}" if _is_number(positive) else positive
        return f"P({name}) = {prediction['score']:.3f}"
    if task == "multiclass":
        best = max(v for k, v in prediction.items() if k.startswith("score_"))
        return f"predicted {prediction['pred']} (P = {best:.3f})"
    if task == "regression":
        return f"predicted value {prediction['score']:.3g}"
    return f"risk score {prediction['score']:.3g}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _sample(values: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(values) <= n:
        return values
    return np.random.default_rng(seed).choice(values, n, replace=False)


def explain_cohort(store, run_dir, out_dir, slides_dir=None, masks_dir=None, slide_ids=None, labels=None,
                   out_of_fold: bool = False) -> pd.DataFrame:
    """Write a heatmap PNG per slide to ``out_dir`` and heatmaps.csv / heatmaps.json.

    Relevance maps are saved as ``relevance/<slide_id>.npy`` and drawn on one colour scale for
    all slides, beside PCA-RGB views that share one PCA fitted on cells of all slides. With
    ``out_of_fold`` each slide of the run's cross-validation is explained (and scored) by the
    model of the fold that held it out, so lesion AUCs are not measured on training slides.
    True labels come from ``labels`` (CSV or DataFrame) or the run's out-of-fold table. Lesion
    masks ``<slide_id>_lesion.png`` are looked up in ``masks_dir`` (default: ``slides_dir``);
    where found, the heatmap AUC against lesion cells is reported.
    """
    models = _Models(run_dir, out_of_fold)
    source = SlideSource(store, models.final.config["params"].get("cache_mb", 1024))
    if slide_ids is None:
        slide_ids = sorted(models.fold_of) if out_of_fold else list_store_slides(store)
    slide_ids = list(slide_ids)
    if not slide_ids:
        raise NicError(f"{store}: no complete slides to explain")
    out_dir = Path(out_dir)
    (out_dir / "relevance").mkdir(parents=True, exist_ok=True)
    masks_dir = Path(masks_dir) if masks_dir is not None else (Path(slides_dir) if slides_dir else None)
    files, truth = _slide_files(slides_dir), _true_labels(run_dir, labels, models.final.task)
    rows, titles, codes, values = [], {}, [], []
    for i, sid in enumerate(slide_ids):  # pass 1: relevance, scores, lesion AUC, samples for the scales
        bundle, origin = models.for_slide(sid)
        check_store_matches(bundle, source, sid)
        meta = source.meta(sid)
        scores = bundle.raw_scores(source, sid)
        prediction = bundle.predict_row(source, sid, scores)
        heat = bundle.explain(source, sid, scores)
        np.save(out_dir / "relevance" / f"{sid}.npy", heat)
        codes.append(sample_codes(source.features(sid), source.tissue(sid), PCA_CELLS, seed=i))
        values.append(_sample(heat[np.isfinite(heat)], SCALE_CELLS, seed=i))
        row = {"slide_id": sid, **prediction, "true_label": truth.get(sid), "model": origin,
               "n_tissue_cells": int(np.isfinite(heat).sum())}
        lesion = _lesion(masks_dir, sid, meta, _slide_extent(files.get(sid), meta))
        if lesion is not None:
            row["n_lesion_cells"] = int(((lesion >= 0.5) & np.isfinite(heat)).sum())
            row["lesion_auc"] = heatmap_auc(heat, lesion)
        rows.append(row)
        titles[sid] = (f"{sid} — {bundle.name}, {origin}: {score_text(bundle, prediction)}"
                       f"   ·   true label: {truth.get(sid, 'not given')}")
        source.clear()  # one slide at a time
    scale = HeatScale.from_values(np.concatenate(values))
    pca = PcaRgb.fit(np.concatenate(codes))
    for sid in slide_ids:  # pass 2: draw every slide on the cohort's scale and PCA
        meta = source.meta(sid)
        extent_um = _slide_extent(files.get(sid), meta)
        render(out_dir / f"{sid}.png", np.load(out_dir / "relevance" / f"{sid}.npy"),
               pca.apply(source.features(sid), source.tissue(sid)), _grid_extent(meta), scale,
               thumbnail=_thumbnail(files.get(sid)), thumbnail_extent=extent_um, tissue=source.tissue(sid),
               lesion=_lesion(masks_dir, sid, meta, extent_um), lesion_xy=(meta["x"], meta["y"]),
               title=titles[sid], relevance_label=models.final.entry.explanation)
        source.clear()
    frame = pd.DataFrame(rows)
    frame.to_csv(out_dir / "heatmaps.csv", index=False)
    _write_summary(out_dir, models, frame, scale, out_of_fold)
    return frame


def _write_summary(out_dir: Path, models: _Models, frame: pd.DataFrame, scale: HeatScale, out_of_fold: bool):
    final = models.final
    summary = {"model": final.name, "task": final.task, "method": final.entry.explanation, "n_slides": len(frame),
               "models": "out of fold (each slide by the fold model that held it out)" if out_of_fold
               else "final model (in-sample on its training slides)",
               "scale": scale.as_dict(), "pca": "one PCA for the cohort"}
    if "lesion_auc" in frame.columns:
        aucs = frame["lesion_auc"].dropna()
        summary.update(lesion_auc_mean=float(aucs.mean()) if len(aucs) else None,
                       lesion_auc_min=float(aucs.min()) if len(aucs) else None,
                       n_slides_with_lesion=int(len(aucs)))
    (out_dir / "heatmaps.json").write_text(json.dumps(summary, indent=2))
