"""The Python front door: a cohort from slides to an explained classifier in a few calls.

Every function that runs a graph takes a Dask ``client``; given none, it starts the embedded
local cluster for the call (:func:`pipeline.runtime.cluster.connect`). Paths are made absolute
here, on the client, because a worker's working directory is not the user's.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

from models.registry import create_encoder
from pipeline.classify import predict_cohort, train_cohort
from pipeline.classify.explain import explain_cohort
from pipeline.compress.encode import EncoderSettings
from pipeline.compress.graph import CompressReport, RunOptions
from pipeline.compress.jobs import SlideJob, plan_jobs
from pipeline.compress.graph import compress as run_compress
from pipeline.io import open_slide
from pipeline.runtime.cluster import connect
from pipeline.runtime.preflight import absolute, preflight

__all__ = ["open_slide", "compress", "train", "predict", "explain", "create_encoder", "connect"]


@contextlib.contextmanager
def _client_or_embedded(client, **connect_options):
    """``client`` as it is, or the embedded cluster for the duration of the call."""
    if client is not None:
        yield client
        return
    with connect(**connect_options) as own:
        yield own


def compress(slides, store: str | os.PathLike, client=None, *, encoder: str = "nic", weights=None,
             mpp: float | None = None, mpp_csv=None, force_mpp: bool = False, precision: str = "auto",
             device: str = "auto", block: int = 256, stride: int | None = None, min_tissue: float = 0.1,
             verify: bool = False,
             redo_changed: bool = False, wait_workers: int = 1, wait_timeout: float = 300.0,
             progress: bool = True, **encoder_options) -> CompressReport:
    """Compress slide files or folders (or a list of :class:`SlideJob`) into a Zarr ``store``.

    ``mpp`` fills in slides whose metadata has no µm/px (``force_mpp``: every slide); ``stride``:
    px between patches (default the encoder's; 64 for overlapping 128 px patches, 4x the cells);
    ``verify`` re-reads the shards of finished slides. Returns a :class:`CompressReport`.
    """
    jobs = list(slides) if slides and isinstance(next(iter(slides)), SlideJob) else plan_jobs(
        [absolute(p) for p in ([slides] if isinstance(slides, (str, os.PathLike)) else slides)],
        mpp=mpp, mpp_csv=absolute(mpp_csv), force_mpp=force_mpp)
    settings = EncoderSettings(encoder, absolute(weights), precision=precision, device=device, **encoder_options)
    if str(encoder).endswith(".json"):  # an encoder card given by path
        settings = replace(settings, name=absolute(encoder))
    store = absolute(store)
    with _client_or_embedded(client) as active:
        preflight(active, inputs=[j.path for j in jobs if not j.problem] + [p for p in (settings.weights,) if p],
                  outputs=[store], wait_workers=wait_workers, timeout=wait_timeout)
        return run_compress(jobs, store, active, settings, block=block, min_tissue=min_tissue, progress=progress,
                            options=RunOptions(verify=verify, redo_changed=redo_changed), stride=stride)


def train(store, labels, out, client=None, *, model: str = "abmil", task: str = "binary", folds: int = 5,
          params: dict | None = None, seed: int = 0, wait_workers: int = 1, wait_timeout: float = 300.0) -> dict:
    """Cross-validate a slide model on a compressed ``store`` and train the final one into ``out``.

    ``labels``: a CSV path (``slide_id,label``) or a DataFrame. Returns the metrics (also in
    ``out/metrics.json``).
    """
    store, out = absolute(store), absolute(out)
    labels = absolute(labels) if isinstance(labels, (str, os.PathLike)) else labels
    with _client_or_embedded(client) as active:
        preflight(active, inputs=[store], outputs=[out], wait_workers=wait_workers, timeout=wait_timeout)
        return train_cohort(store, labels, out, model=model, task=task, folds=folds, client=active,
                            params=params, seed=seed)


def predict(store, model_dir, out=None, slide_ids=None):
    """Score the complete slides of ``store`` with the final model in ``model_dir``; a DataFrame."""
    return predict_cohort(absolute(store), absolute(model_dir), absolute(out), slide_ids)


def explain(store, model_dir, out_dir, slides_dir=None, masks_dir=None, slide_ids=None):
    """Heatmap PNGs (and heatmaps.csv) of each slide's evidence, in ``out_dir``; a DataFrame."""
    return explain_cohort(absolute(store), absolute(model_dir), absolute(out_dir), absolute(slides_dir),
                          absolute(masks_dir), slide_ids)
