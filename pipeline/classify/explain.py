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
from nic_pipeline.io.masks import mask_downsample, read_mask
from nic_pipeline.viz import figure
from nic_pipeline.viz.export import cells_geojson, write_geojson, write_overlay_tiff
from nic_pipeline.viz.heatmap import HeatScale, render
from nic_pipeline.viz.pca import PcaRgb, sample_codes

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


def _slide_size_um(meta: dict, thumbnail_size_um) -> tuple[float, float]:
    """(height_um, width_um) of the slide: from its file when found, else the store's
    ``slide_width``/``slide_height`` attrs, else the grid's extent."""
    if thumbnail_size_um is not None:
        return thumbnail_size_um
    attrs = meta["attrs"]
    if {"slide_width", "slide_height", "slide_mpp"} <= set(attrs):
        return attrs["slide_height"] * attrs["slide_mpp"], attrs["slide_width"] * attrs["slide_mpp"]
    left, right, bottom, top = _grid_extent(meta)
    return bottom, right


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


IN_SAMPLE, OUT_OF_FOLD, HELD_OUT, UNKNOWN = "in-sample", "out-of-fold", "held-out", "in-sample?"
EVALUATION_TEXT = {
    IN_SAMPLE: "in-sample (the final model was trained on this slide)",
    OUT_OF_FOLD: "out-of-fold (explained by the fold model that held it out)",
    HELD_OUT: "held-out (not among the run's training slides)",
    UNKNOWN: "final model; the run records no training slides (trained without folds), so possibly in-sample",
}


class _Models:
    """The model that explains each slide: the model of the fold that held it out (out of fold),
    else the final model; and what that makes each number: out-of-fold, in-sample (the final
    model on one of its training slides), held-out (a slide the run never saw) or unknown."""

    def __init__(self, run_dir, out_of_fold: bool, labels=None):
        self.run_dir = Path(run_dir)
        self.final = SlideModel.load(run_dir)
        oof = self.run_dir / "oof_predictions.csv"
        table = pd.read_csv(oof, dtype={"slide_id": str}) if oof.exists() else None
        if out_of_fold and table is None:
            raise NicError(f"{run_dir}: no out-of-fold predictions (trained with --folds < 2)")
        self.fold_of: dict[str, int] = dict(zip(table["slide_id"], table["fold"].astype(int))) if out_of_fold else {}
        trained = set(table["slide_id"]) if table is not None else set()
        if labels is not None and not trained:  # the final model trains on every labelled slide
            trained = set(load_labels(labels, self.final.task)["slide_id"].astype(str))
        self.trained, self.known = trained, bool(trained)
        self._folds: dict[int, SlideModel] = {}

    def for_slide(self, slide_id: str) -> tuple[SlideModel, str, str]:
        """(model, which model in words, evaluation: one of IN_SAMPLE, OUT_OF_FOLD, HELD_OUT, UNKNOWN)."""
        fold = self.fold_of.get(slide_id)
        if fold is None:
            evaluation = (IN_SAMPLE if slide_id in self.trained else HELD_OUT) if self.known else UNKNOWN
            return self.final, "final model", evaluation
        if fold not in self._folds:
            self._folds[fold] = SlideModel.load(self.run_dir / "folds" / f"fold-{fold}")
        return self._folds[fold], f"out of fold (fold {fold})", OUT_OF_FOLD


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


def _check_fine_store(bundle: SlideModel, source: SlideSource, fine: SlideSource, sid: str) -> None:
    """A finer store explains a slide only for a bag model, from the same patches (encoder, patch
    size, µm/px) at a smaller stride."""
    if bundle.entry.input != "bag":
        raise NicError(f"--fine-store: {bundle.name} reads the grid at its training stride; a finer map needs a "
                       "bag model (abmil, clam-sb, topk, dsmil, transmil, mean, max)")
    check_store_matches(bundle, fine, sid)
    coarse, dense = source.meta(sid)["attrs"], fine.meta(sid)["attrs"]
    for key in ("patch_size", "mpp", "encoder"):
        if coarse.get(key) != dense.get(key):
            raise NicError(f"--fine-store: slide {sid!r} has {key} {dense.get(key)!r} there and {coarse.get(key)!r} "
                           "in the store the model scores; compress it with the same encoder and a smaller --stride")


def explain_cohort(store, run_dir, out_dir, slides_dir=None, masks_dir=None, slide_ids=None, labels=None,
                   out_of_fold: bool = False, fine_store=None, geojson: bool = False,
                   overlay: bool = False) -> pd.DataFrame:
    """Write a heatmap PNG per slide to ``out_dir`` and heatmaps.csv / heatmaps.json.

    Relevance maps are saved as ``relevance/<slide_id>.npy`` (raw, the model's unit) and drawn on
    one colour scale for all slides whose colour bar reads in cohort percentiles, beside PCA-RGB
    views that share one PCA fitted on cells of all slides. With ``out_of_fold`` each slide of the
    run's cross-validation is explained (and scored) by the model of the fold that held it out, so
    lesion AUCs are not measured on training slides; every row says which (``evaluation``).
    Slide files (thumbnails) come from ``slides_dir``, else from the source path the store
    recorded. True labels come from ``labels`` (CSV or DataFrame) or the run's out-of-fold table.
    Lesion masks ``<slide_id>_lesion.png`` are looked up in ``masks_dir`` (default: ``slides_dir``);
    where found, the heatmap AUC against lesion cells is reported. ``fine_store``: a store of the
    same slides compressed at a smaller stride (overlapping patches): the slide is scored on
    ``store`` and its map drawn from the finer grid (bag models). ``geojson`` / ``overlay`` also
    write ``qupath/<slide_id>.geojson`` and ``overlay/<slide_id>.tif`` (:mod:`nic_pipeline.viz.export`).
    """
    models = _Models(run_dir, out_of_fold, labels)
    cache_mb = models.final.config["params"].get("cache_mb", 1024)
    source = SlideSource(store, cache_mb)
    fine = SlideSource(fine_store, cache_mb) if fine_store is not None else None
    fine_ids = set(list_store_slides(fine_store)) if fine_store is not None else set()
    if slide_ids is None:
        slide_ids = sorted(models.fold_of) if out_of_fold else list_store_slides(store)
    slide_ids = list(slide_ids)
    if not slide_ids:
        raise NicError(f"{store}: no complete slides to explain")
    out_dir = Path(out_dir)
    (out_dir / "relevance").mkdir(parents=True, exist_ok=True)
    masks_dir = Path(masks_dir) if masks_dir is not None else (Path(slides_dir) if slides_dir else None)
    files, truth = figure.slide_files_by_id(slides_dir), _true_labels(run_dir, labels, models.final.task)
    figure.check_folders_hold_slides(files, slide_ids, slides_dir)
    rows, titles, codes, values, drawn_from = [], {}, [], [], {}
    for i, sid in enumerate(slide_ids):  # pass 1: relevance, scores, lesion AUC, samples for the scales
        bundle, which, evaluation = models.for_slide(sid)
        check_store_matches(bundle, source, sid)
        scores = bundle.raw_scores(source, sid)
        prediction = bundle.predict_row(source, sid, scores)
        grid = source
        if sid in fine_ids:
            _check_fine_store(bundle, source, fine, sid)
            grid = fine
        drawn_from[sid] = grid
        meta = grid.meta(sid)
        heat = bundle.explain(grid, sid, scores)
        np.save(out_dir / "relevance" / f"{sid}.npy", heat)
        codes.append(sample_codes(grid.features(sid), grid.tissue(sid), PCA_CELLS, seed=i))
        values.append(_sample(heat[np.isfinite(heat)], SCALE_CELLS, seed=i))
        finite = heat[np.isfinite(heat)]
        row = {"slide_id": sid, **prediction, "true_label": truth.get(sid), "model": which, "evaluation": evaluation,
               "n_tissue_cells": int(finite.size), "cell_um": _cell_step(meta["x"], meta["attrs"]),
               "relevance_max": float(finite.max()) if finite.size else np.nan}
        path = figure.slide_file(sid, meta["attrs"], files)
        size_um = _slide_size_um(meta, figure.slide_size_um(path, meta["attrs"].get("slide_mpp")) if path else None)
        lesion = _lesion(masks_dir, sid, meta, size_um)
        if lesion is not None:
            row["n_lesion_cells"] = int(((lesion >= 0.5) & np.isfinite(heat)).sum())
            row["lesion_auc"] = heatmap_auc(heat, lesion)
        rows.append(row)
        said = which if evaluation == OUT_OF_FOLD else f"{which}, {evaluation}"  # "out of fold (fold 2)"
        titles[sid] = (f"{sid} — {bundle.name}, {said}: {score_text(bundle, prediction)}"
                       f"   ·   true label: {truth.get(sid, 'not given')}")
        for s in {source, grid}:
            s.clear()  # one slide at a time
    scale = HeatScale.from_values(np.concatenate(values))
    pca = PcaRgb.fit(np.concatenate(codes))
    for row in rows:
        row["relevance_max_percentile"] = float(scale.percentile(row["relevance_max"]))
    for sid in slide_ids:  # pass 2: draw every slide on the cohort's scale and PCA
        grid = drawn_from[sid]
        meta = grid.meta(sid)
        heat = np.load(out_dir / "relevance" / f"{sid}.npy")
        path = figure.slide_file(sid, meta["attrs"], files)
        thumbnail, size_um = (figure.slide_thumbnail(path, meta["attrs"].get("slide_mpp"))
                              if path is not None else (None, None))
        render(out_dir / f"{sid}.png", heat, pca.apply(grid.features(sid), grid.tissue(sid)), _grid_extent(meta),
               scale, thumbnail=thumbnail, thumbnail_extent=size_um, tissue=grid.tissue(sid),
               lesion=_lesion(masks_dir, sid, meta, size_um), lesion_xy=(meta["x"], meta["y"]),
               title=titles[sid], relevance_label=models.final.entry.explanation)
        if geojson or overlay:
            _export(out_dir, sid, meta, heat, grid.tissue(sid), scale, _slide_size_um(meta, size_um), geojson, overlay)
        grid.clear()
    frame = pd.DataFrame(rows)
    frame.to_csv(out_dir / "heatmaps.csv", index=False)
    _write_summary(out_dir, models, frame, scale, out_of_fold)
    return frame


def _export(out_dir: Path, sid: str, meta: dict, heat, tissue, scale: HeatScale, size_um, geojson: bool,
            overlay: bool) -> None:
    """``qupath/<sid>.geojson`` (each tissue cell a tile with its relevance, cohort percentile and
    tissue fraction) and ``overlay/<sid>.tif`` (the PNG's colours as a pyramidal TIFF)."""
    slide_mpp = meta["attrs"].get("slide_mpp") or meta["attrs"].get("mpp")
    step = _cell_step(meta["x"], meta["attrs"])
    if geojson:
        measurements = {"NIC relevance": heat, "NIC relevance cohort percentile": scale.percentile(heat),
                        "NIC tissue fraction": np.where(np.isfinite(heat), tissue, np.nan)}
        write_geojson(out_dir / "qupath" / f"{sid}.geojson",
                      cells_geojson(measurements, meta["x"], meta["y"], step, slide_mpp))
    if overlay:
        size_px = (int(round(size_um[1] / slide_mpp)), int(round(size_um[0] / slide_mpp)))
        rgba = (scale.overlay(heat) * 255 + 0.5).astype(np.uint8)
        write_overlay_tiff(out_dir / "overlay" / f"{sid}.tif", rgba, meta["x"], meta["y"], step, slide_mpp, size_px)


def lesion_auc_summary(frame: pd.DataFrame) -> dict:
    """Lesion AUCs per evaluation kind: {kind: {median, mean, min, n}} (never mixed across kinds)."""
    if "lesion_auc" not in frame.columns:
        return {}
    out = {}
    for kind, part in frame.dropna(subset=["lesion_auc"]).groupby("evaluation"):
        aucs = part["lesion_auc"]
        out[kind] = {"median": float(aucs.median()), "mean": float(aucs.mean()), "min": float(aucs.min()),
                     "n_slides": int(len(aucs))}
    return out


def _write_summary(out_dir: Path, models: _Models, frame: pd.DataFrame, scale: HeatScale, out_of_fold: bool):
    final = models.final
    counts = frame["evaluation"].value_counts().to_dict()
    summary = {"model": final.name, "task": final.task, "method": final.entry.explanation, "n_slides": len(frame),
               "models": "out of fold (each slide by the fold model that held it out)" if out_of_fold
               else "final model (in-sample on its training slides)",
               "evaluation": {kind: {"n_slides": int(n), "means": EVALUATION_TEXT[kind]} for kind, n in counts.items()},
               "colour_bar": "cohort percentile of tissue cells; raw relevance at percentiles in 'percentiles'",
               "percentiles": scale.summary(), "scale": scale.as_dict(), "pca": "one PCA for the cohort"}
    by_kind = lesion_auc_summary(frame)
    if by_kind:
        summary["lesion_auc"] = by_kind
        aucs = frame["lesion_auc"].dropna()
        summary.update(lesion_auc_mean=float(aucs.mean()) if len(aucs) else None,
                       lesion_auc_min=float(aucs.min()) if len(aucs) else None,
                       n_slides_with_lesion=int(len(aucs)))
    (out_dir / "heatmaps.json").write_text(json.dumps(summary, indent=2))
