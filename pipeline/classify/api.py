"""The front door's ``train``, ``predict`` and ``explain``: a compressed cohort in, a
cross-validated slide model, its scores and its heatmaps out."""

from __future__ import annotations

import os

from nic_models.slide_models.registry import DEFAULT_SLIDE_MODEL
from nic_pipeline.classify.explain import explain_cohort
from nic_pipeline.classify.graph import predict_cohort, train_cohort
from nic_pipeline.runtime.cluster import client_or_embedded
from nic_pipeline.runtime.preflight import absolute, preflight


def train(store, labels, out, client=None, *, model: str = DEFAULT_SLIDE_MODEL, task: str = "binary", folds: int = 5,
          params: dict | None = None, seed: int = 0, wait_workers: int = 1, wait_timeout: float = 300.0,
          splits=None) -> dict:
    """Cross-validate a slide model on a compressed ``store`` and train the final one into ``out``.

    ``labels``: a CSV path (``slide_id,label``) or a DataFrame; ``splits``: fixed splits (a CLAM
    ``splits_K.csv`` or a folder of them) instead of ``folds``. Returns the metrics (also in
    ``out/metrics.json``): out-of-fold, each block labelled so, with the spread over folds.
    """
    store, out = absolute(store), absolute(out)
    labels = absolute(labels) if isinstance(labels, (str, os.PathLike)) else labels
    with client_or_embedded(client) as active:
        preflight(active, inputs=[store], outputs=[out], wait_workers=wait_workers, timeout=wait_timeout)
        return train_cohort(store, labels, out, model=model, task=task, folds=folds, client=active,
                            params=params, seed=seed, splits=absolute(splits))


def predict(store, model_dir, out=None, slide_ids=None):
    """Score the complete slides of ``store`` with the final model in ``model_dir``; a DataFrame."""
    return predict_cohort(absolute(store), absolute(model_dir), absolute(out), slide_ids)


def explain(store, model_dir, out_dir, slides_dir=None, masks_dir=None, slide_ids=None):
    """Heatmap PNGs (and heatmaps.csv) of each slide's evidence, in ``out_dir``; a DataFrame."""
    return explain_cohort(absolute(store), absolute(model_dir), absolute(out_dir), absolute(slides_dir),
                          absolute(masks_dir), slide_ids)
