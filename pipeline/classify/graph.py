"""The fold graph: cross-validation and the final model as Dask tasks, and prediction.

A run directory holds:

    RUN_DIR/config.json, model.safetensors     final model, trained on all labelled slides
    RUN_DIR/folds/fold-K/...                    the model of each cross-validation fold
    RUN_DIR/oof_predictions.csv                 out-of-fold predictions (slide_id, fold, label, score...)
    RUN_DIR/metrics.json                        per-fold, mean-over-folds and pooled metrics
    RUN_DIR/tasks.json                          which worker ran each fold task, and when

Each fold is one Dask task (``train-fold-K-<model>-<token>``), plus one ``train-final-...``
task; tasks get the store path, slide ids and the registry entry, read tensors themselves one
slide (or crop) at a time through :class:`SlideSource`, save weights to RUN_DIR and return only
predictions and metrics.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from distributed import as_completed, get_worker
from tqdm.auto import tqdm

from nic_models.slide_models.registry import DEFAULT_SLIDE_MODEL
from nic_models.slide_models import get_slide_model_spec
from nic_pipeline.classify.bundle import SlideModel, check_store_matches, resolve_params
from nic_pipeline.classify.fit import UNITS, fit, seconds_per_unit, training_units
from nic_pipeline.classify.labels import assign_folds, encode_targets, load_labels, target_spec
from nic_pipeline.classify.metrics import json_safe, summarize_folds, task_metrics
from nic_pipeline.classify.source import SlideSource, list_store_slides
from nic_pipeline.errors import NicError
from nic_pipeline.runtime.cluster import connect, gpu_resources
from nic_pipeline.runtime.process import keep_freed_memory

LONG_RUN_S = 600  # warn with an estimate when CPU training will take longer


def run_fold_task(*args, **kwargs) -> dict:
    """:func:`run_fold` as a Dask task: a failure the user can fix (a damaged store, say) comes
    back as ``{"error": ...}`` for the client to print as one line, not as a worker traceback."""
    try:
        return run_fold(*args, **kwargs)
    except NicError as err:
        return {"error": str(err)}


def run_fold(store, run_dir, fold, train_ids, test_ids, labels_records, model, task, spec, params,
             store_info=None, topic=None) -> dict:
    """One Dask task: train on ``train_ids``, save weights, predict ``test_ids``.

    ``fold`` is an int (cross-validation fold, weights in RUN_DIR/folds/fold-K) or "final"
    (all slides, weights in RUN_DIR). Training progress goes to the client as events on
    ``topic``. Returns small results: prediction rows, metrics and which worker ran it and when.
    """
    started = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers share the cores
    keep_freed_memory()  # batches reuse the heap rather than fresh pages (Dask's MALLOC_TRIM_THRESHOLD_)
    try:
        labels = pd.DataFrame.from_records(labels_records).set_index("slide_id")
        params = dict(params, seed=int(params.get("seed", 0)) + (0 if fold == "final" else 1000 * (int(fold) + 1)))
        source = SlideSource(store, params.get("cache_mb", 1024))
        train = labels.loc[list(train_ids)].reset_index()
        progress = _Progress(topic)
        bundle = fit(model, task, source, list(train_ids), encode_targets(train, spec), spec, params, store_info,
                     progress)
        progress.flush()
        bundle.config["fold"] = fold
        directory = Path(run_dir) if fold == "final" else Path(run_dir) / "folds" / f"fold-{fold}"
        bundle.save(directory)
        rows = []
        if test_ids:
            test = labels.loc[list(test_ids)].reset_index()
            encoded = encode_targets(test, spec)
            for i, sid in enumerate(test_ids):
                row = {"slide_id": sid, "fold": fold}
                row.update({c: test.at[i, c] for c in ("label", "group", "time", "event") if c in test.columns})
                row["target"] = encoded["target"][i].item() if task != "regression" else float(test.at[i, "label"])
                row.update(bundle.predict_row(source, sid))
                rows.append(row)
        metrics = task_metrics(task, pd.DataFrame(rows), spec.get("classes")) if rows else {}
    finally:
        torch.set_num_threads(threads)
    return dict(fold=fold, predictions=rows, metrics=metrics, worker=_worker_address(),
                pid=os.getpid(), start=started, end=time.time(), weights=str(directory / "model.safetensors"))


class _Progress:
    """Sends a fold task's training progress to the client as Dask worker events, at most once a
    second (nothing outside a worker)."""

    def __init__(self, topic: str | None):
        self.topic, self.pending, self.last = topic, 0, time.monotonic()
        try:
            self.worker = get_worker() if topic else None
        except ValueError:
            self.worker = None

    def __call__(self, n: int) -> None:
        self.pending += n
        if time.monotonic() - self.last >= 1.0:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.worker is not None:
            self.worker.log_event(self.topic, self.pending)
        self.pending, self.last = 0, time.monotonic()


def _worker_address() -> str:
    try:
        return get_worker().address
    except ValueError:
        return "local"


def _store_info(source: SlideSource, slide_ids) -> dict:
    """Encoder and geometry of the store; NicError when the slides do not share a code size."""
    dims = {}
    for sid in slide_ids:
        meta = source.meta(sid)
        dims.setdefault(meta["shape"][0], sid)
    if len(dims) > 1:
        raise NicError(f"{source.store}: slides have different code sizes {sorted(dims)} "
                       f"(e.g. {list(dims.values())[:2]}); compress the cohort with one encoder")
    attrs = source.meta(slide_ids[0])["attrs"]
    keep = ("encoder", "encoder_sha256", "mpp", "patch_size", "stride")
    return {k: attrs[k] for k in keep if k in attrs} | {"code_dim": next(iter(dims))}


def _cohort(store, labels, task) -> tuple[pd.DataFrame, dict]:
    """Labels of the complete slides in the store, and what was left out (store slides without a
    row, rows without a label: counted in metrics.json); NicError naming labelled slides not in it."""
    frame = load_labels(labels, task)
    available = set(list_store_slides(store))
    missing = [s for s in frame["slide_id"] if s not in available]
    if missing:
        raise NicError(f"{store}: {len(missing)} labelled slide(s) not complete in the store "
                       f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                       "compress them or drop them from the labels CSV")
    without = frame.attrs.get("without_label", [])
    left_out = {"unlabelled_slides_in_store": len(available - set(frame["slide_id"]) - set(without)),
                "slides_without_label": len(without), "slides_without_label_ids": without}
    return frame.reset_index(drop=True), left_out


def train_cohort(store, labels, out, model=DEFAULT_SLIDE_MODEL, task: str = "binary", folds: int = 5,
                 client=None, scheduler=None, scheduler_file=None, workers=None,
                 params: dict | None = None, seed: int = 0) -> dict:
    """Cross-validate ``model`` (a registered name, or a registry entry) on a compressed cohort
    and train the final model; returns metrics.

    ``labels`` is a CSV path or a DataFrame. Each fold and the final model are Dask tasks on
    ``client`` (or on a cluster from :func:`connect`). Writes the run directory ``out``.
    """
    model = get_slide_model_spec(model)  # tasks get the entry itself: heads registered at run time work
    params = resolve_params(model, {**(params or {}), "seed": seed})
    frame, left_out = _cohort(store, labels, task)
    spec = target_spec(frame, task)
    slide_ids = frame["slide_id"].tolist()
    info = _store_info(SlideSource(store, 0), slide_ids)
    fold_of = assign_folds(frame, task, folds, seed) if folds >= 2 else np.full(len(frame), -1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = frame.to_dict("records")
    token = uuid.uuid4().hex[:8]
    if client is None:
        with connect(scheduler, scheduler_file, workers) as own:
            results = _run_graph(own, store, out, model, task, spec, params, info, slide_ids, fold_of, records, token)
    else:
        results = _run_graph(client, store, out, model, task, spec, params, info, slide_ids, fold_of, records, token)
    return _write_outputs(out, model, task, spec, params, info, results, left_out, folds)


def _run_graph(client, store, out, model, task, spec, params, info, slide_ids, fold_of, records, token,
               progress=True):
    resources = gpu_resources(client)
    jobs = [(int(k), [s for s, f in zip(slide_ids, fold_of) if f != k], [s for s, f in zip(slide_ids, fold_of) if f == k])
            for k in sorted(set(fold_of.tolist())) if k >= 0]
    jobs.append(("final", slide_ids, []))
    if not resources:
        _warn_if_long(client, model, params, info["code_dim"], jobs)
    units, unit = training_units(model, params)
    topic = f"nic-train-{token}"
    desc = f"{model.name}: {len(jobs) - 1} folds + final model"
    with tqdm(total=units * len(jobs), desc=desc, unit=unit, disable=not progress) as bar:
        client.subscribe_topic(topic, lambda event: bar.update(event[1]))
        try:
            futures = [client.submit(run_fold_task, str(store), str(out), fold, train_ids, test_ids, records, model, task,
                                     spec, params, info, topic, key=_task_key(fold, model, token), pure=False,
                                     resources=resources)
                       for fold, train_ids, test_ids in jobs]
            for done, _ in enumerate(as_completed(futures), 1):
                bar.set_postfix(tasks=f"{done}/{len(futures)}")
            bar.update(bar.total - bar.n)  # the last events may still be on their way
        finally:
            client.unsubscribe_topic(topic)
    results = [future.result() | {"key": future.key} for future in futures]
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise NicError(failed[0])
    return results


def _task_key(fold, model, token: str) -> str:
    return f"train-{'final' if fold == 'final' else f'fold-{fold}'}-{model.name}-{token}"


def _warn_if_long(client, model, params: dict, code_dim: int, jobs) -> None:
    """Warn, with an estimate, when training on CPU workers will take over LONG_RUN_S."""
    per_unit = seconds_per_unit(model, params, code_dim, max(len(train) for _, train, _ in jobs))
    units, unit = training_units(model, params)
    slots = max(sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()), 1)
    per_task = per_unit * units
    wall = per_task * math.ceil(len(jobs) / slots)
    if wall > LONG_RUN_S:
        warnings.warn(f"{model.name} on CPU workers will take about {_minutes(per_task)} per fold task ({units} {unit}s "
                      f"at {per_unit:.2g} s) and about {_minutes(wall)} for {len(jobs)} tasks on {slots} worker "
                      f"thread(s); on a CPU, --model abmil (or fewer --param {UNITS[model.input][0]}=...) is faster",
                      stacklevel=4)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _write_outputs(out, model, task, spec, params, info, results, left_out, folds) -> dict:
    fold_results = [r for r in results if r["fold"] != "final"]
    rows = [row for r in fold_results for row in r["predictions"]]
    oof = pd.DataFrame(rows)
    if len(oof):
        oof = oof.sort_values("slide_id").reset_index(drop=True)
        oof.to_csv(out / "oof_predictions.csv", index=False)
    metrics = {
        "model": model.name, "task": task, "folds": folds, "n_slides": int(sum(len(r["predictions"]) for r in fold_results)),
        "classes": spec.get("classes"), "store": info, "params": params,
        "per_fold": [dict(r["metrics"], fold=r["fold"]) for r in fold_results],
        "mean_over_folds": summarize_folds([r["metrics"] for r in fold_results]),
        "pooled": task_metrics(task, oof, spec.get("classes")) if len(oof) else {},
        "final_model": "model.safetensors",
        **left_out,
    }
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    timeline = [{k: r[k] for k in ("key", "fold", "worker", "pid", "start", "end")} for r in results]
    (out / "tasks.json").write_text(json.dumps(timeline, indent=2))
    metrics["tasks"] = timeline
    return metrics


def predict_cohort(store, run_dir, out=None, slide_ids=None) -> pd.DataFrame:
    """Score the complete slides of ``store`` (or ``slide_ids``) with the final model of ``run_dir``.

    Writes ``out`` (CSV: slide_id + score columns) when given; returns the table.
    """
    bundle = SlideModel.load(run_dir)
    params = bundle.config["params"]
    source = SlideSource(store, params.get("cache_mb", 1024))
    slide_ids = list(slide_ids) if slide_ids is not None else list_store_slides(store)
    if not slide_ids:
        raise NicError(f"{store}: no complete slides to score")
    rows = []
    with torch.no_grad():
        for sid in slide_ids:
            check_store_matches(bundle, source, sid)
            rows.append({"slide_id": sid, **bundle.predict_row(source, sid)})
            source.clear()  # one slide at a time
    frame = pd.DataFrame(rows)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False)
    return frame


def metrics_summary(metrics: dict) -> str:
    """A one-line human summary of train_cohort's metrics for the CLI."""
    pooled = {k: v for k, v in metrics.get("pooled", {}).items() if isinstance(v, float) and not math.isnan(v)}
    parts = [f"{k}={v:.3f}" for k, v in pooled.items()]
    return f"{metrics['model']} {metrics['task']}, {metrics['n_slides']} slides, {metrics['folds']} folds: " + (
        ", ".join(parts) if parts else "no cross-validation metrics")
