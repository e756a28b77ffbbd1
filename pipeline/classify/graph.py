"""The fold graph: cross-validation and the final model as Dask tasks, and prediction.

A run directory holds:

    RUN_DIR/config.json, model.safetensors     final model, trained on all labelled slides
    RUN_DIR/folds/fold-K/...                    the model of each cross-validation fold
    RUN_DIR/oof_predictions.csv                 out-of-fold predictions (slide_id, fold, split, label, score...)
    RUN_DIR/metrics.json                        per-fold, mean-over-folds and pooled metrics, all out-of-fold
    RUN_DIR/splits/splits_K.csv                 each fold's train/val/test slide ids, in CLAM's format
    RUN_DIR/tasks.json                          which worker ran each fold task, and when

Each fold is one Dask task (``train-fold-K-<model>-<token>``), plus one ``train-final-...``
task; tasks get the store path, slide ids and the registry entry, read tensors themselves one
slide (or crop) at a time through :class:`SlideSource`, save weights to RUN_DIR and return only
predictions and metrics.

Every figure says what it is: the cross-validation metrics are **out-of-fold** (each slide scored
by the fold model that did not train on it; the spread over folds beside the pooled figure), and
:func:`predict_cohort` marks the slides that the final model trained on (their scores are
**in-sample**).
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

from nic_models.slide_models import get_slide_model_spec
from nic_models.slide_models.registry import DEFAULT_SLIDE_MODEL
from nic_pipeline.classify.bundle import SlideModel, check_store_matches, resolve_params
from nic_pipeline.classify.fit import UNITS, fit, seconds_per_unit, training_units
from nic_pipeline.classify.labels import (
    assign_folds,
    encode_targets,
    load_labels,
    read_splits,
    target_spec,
    write_splits,
)
from nic_pipeline.classify.metrics import OUT_OF_FOLD, format_spread, json_safe, summarize_folds, task_metrics
from nic_pipeline.classify.source import SlideSource, list_store_slides
from nic_pipeline.errors import NicError
from nic_pipeline.runtime.cluster import connect, gpu_resources
from nic_pipeline.runtime.process import keep_freed_memory
from nic_pipeline.runtime.progress import progress_bar

LONG_RUN_S = 600  # warn with an estimate when CPU training will take longer


class InSampleWarning(UserWarning):
    """Scores of slides the model trained on (in-sample) are among those asked for."""


def run_fold_task(*args, **kwargs) -> dict:
    """:func:`run_fold` as a Dask task: a failure the user can fix (a damaged store, say) comes
    back as ``{"error": ...}`` for the client to print as one line, not as a worker traceback."""
    try:
        return run_fold(*args, **kwargs)
    except NicError as err:
        return {"error": str(err)}


def run_fold(store, run_dir, fold, train_ids, test_ids, labels_records, model, task, spec, params,
             store_info=None, topic=None, val_ids=()) -> dict:
    """One Dask task: train on ``train_ids``, save weights, predict ``test_ids`` (and ``val_ids``,
    the validation column of a fixed split: scored and reported apart, never trained on).

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
        for split, ids in (("test", list(test_ids)), ("val", list(val_ids))):
            if not ids:
                continue
            held_out = labels.loc[ids].reset_index()
            encoded = encode_targets(held_out, spec)
            for i, sid in enumerate(ids):
                row = {"slide_id": sid, "fold": fold, "split": split}
                row.update({c: held_out.at[i, c] for c in ("label", "group", "time", "event") if c in held_out.columns})
                row["target"] = encoded["target"][i].item() if task != "regression" else float(held_out.at[i, "label"])
                row.update(bundle.predict_row(source, sid))
                rows.append(row)
        test_rows = pd.DataFrame([r for r in rows if r["split"] == "test"])
        val_rows = pd.DataFrame([r for r in rows if r["split"] == "val"])
        metrics = task_metrics(task, test_rows, spec.get("classes")) if len(test_rows) else {}
        if len(val_rows):
            metrics["val"] = task_metrics(task, val_rows, spec.get("classes"))
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
        dims.setdefault(source.shape(sid)[0], sid)
    if len(dims) > 1:
        raise NicError(f"{source.store}: slides have different code sizes {sorted(dims)} "
                       f"(e.g. {list(dims.values())[:2]}); compress the cohort with one encoder")
    attrs = source.attrs(slide_ids[0])
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
                 params: dict | None = None, seed: int = 0, splits=None) -> dict:
    """Cross-validate ``model`` (a registered name, or a registry entry) on a compressed cohort
    and train the final model; returns metrics (out-of-fold, labelled so).

    ``labels`` is a CSV path or a DataFrame. Each fold and the final model are Dask tasks on
    ``client`` (or on a cluster from :func:`connect`). Writes the run directory ``out``.
    ``splits``: fixed splits instead of ``folds`` random folds, a CLAM ``splits_K.csv`` file or a
    folder of them (:func:`~nic_pipeline.classify.labels.read_splits`): fold K trains on its train
    column and scores its test column (and, reported apart, its val column). Either way the run
    writes each fold's split to ``out/splits/splits_K.csv`` in CLAM's format.
    """
    model = get_slide_model_spec(model)  # tasks get the entry itself: heads registered at run time work
    params = resolve_params(model, {**(params or {}), "seed": seed})
    frame, left_out = _cohort(store, labels, task)
    spec = target_spec(frame, task)
    slide_ids = frame["slide_id"].tolist()
    info = _store_info(SlideSource(store, 0), slide_ids)
    if splits is not None:
        fixed = _check_splits(read_splits(splits), slide_ids, splits)
        folds = len(fixed)
    else:
        fold_of = assign_folds(frame, task, folds, seed) if folds >= 2 else np.full(len(frame), -1)
        fixed = [{"train": [s for s, f in zip(slide_ids, fold_of) if f != k], "val": [],
                  "test": [s for s, f in zip(slide_ids, fold_of) if f == k]}
                 for k in sorted(set(fold_of.tolist())) if k >= 0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = frame.to_dict("records")
    token = uuid.uuid4().hex[:8]
    if client is None:
        with connect(scheduler, scheduler_file, workers) as own:
            results = _run_graph(own, store, out, model, task, spec, params, info, slide_ids, fixed, records, token)
    else:
        results = _run_graph(client, store, out, model, task, spec, params, info, slide_ids, fixed, records, token)
    if fixed:
        write_splits(out / "splits", fixed)
    return _write_outputs(out, model, task, spec, params, info, results, left_out, folds, splits)


def _check_splits(fixed: list[dict], slide_ids: list[str], where) -> list[dict]:
    """NicError naming the split slides that are not labelled slides of the store."""
    known = set(slide_ids)
    for k, split in enumerate(fixed):
        unknown = [s for column in ("train", "val", "test") for s in split[column] if s not in known]
        if unknown:
            raise NicError(f"{where}: split {k} lists {len(unknown)} slide(s) that are not labelled slides complete in "
                           f"the store: {', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}")
    return fixed


def _run_graph(client, store, out, model, task, spec, params, info, slide_ids, fixed, records, token,
               progress=True):
    resources = gpu_resources(client)
    jobs = [(k, split["train"], split["test"], split["val"]) for k, split in enumerate(fixed)]
    jobs.append(("final", slide_ids, [], []))
    if not resources:
        _warn_if_long(client, model, params, info["code_dim"], jobs)
    units, unit = training_units(model, params)
    topic = f"nic-train-{token}"
    desc = f"{model.name}: {len(jobs) - 1} folds + final model"
    with progress_bar(total=units * len(jobs), desc=desc, unit=unit, disable=not progress) as bar:
        client.subscribe_topic(topic, lambda event: bar.update(event[1]))
        try:
            futures = [client.submit(run_fold_task, str(store), str(out), fold, train_ids, test_ids, records, model, task,
                                     spec, params, info, topic, val_ids, key=_task_key(fold, model, token), pure=False,
                                     resources=resources)
                       for fold, train_ids, test_ids, val_ids in jobs]
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
    per_unit = seconds_per_unit(model, params, code_dim, max(len(job[1]) for job in jobs))
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


def _write_outputs(out, model, task, spec, params, info, results, left_out, folds, splits=None) -> dict:
    fold_results = sorted((r for r in results if r["fold"] != "final"), key=lambda r: r["fold"])
    rows = [row for r in fold_results for row in r["predictions"]]
    oof = pd.DataFrame(rows)
    if len(oof):
        oof = oof.sort_values(["slide_id", "fold"]).reset_index(drop=True)
        oof.to_csv(out / "oof_predictions.csv", index=False)
    test = oof[oof["split"] == "test"] if len(oof) else oof
    per_fold = [{k: v for k, v in r["metrics"].items() if k != "val"} for r in fold_results]
    metrics = {
        "model": model.name, "task": task, "folds": folds, "n_slides": int(len(test)),
        "evaluation": OUT_OF_FOLD if len(test) else "no cross-validation: the final model only (no held-out scores)",
        "splits": str(splits) if splits is not None else ("random folds" if fold_results else None),
        "classes": spec.get("classes"), "store": info, "params": params,
        "per_fold": [dict(m, fold=r["fold"], evaluation=f"out-of-fold: fold {r['fold']}'s held-out test slides")
                     for m, r in zip(per_fold, fold_results)],
        "mean_over_folds": dict(summarize_folds(per_fold), evaluation="out-of-fold: mean, sd, min and max over folds")
        if fold_results else {},
        "pooled": dict(task_metrics(task, test, spec.get("classes")),
                       evaluation="out-of-fold: all held-out test predictions pooled") if len(test) else {},
        "final_model": "model.safetensors (trained on every labelled slide: its scores of them are in-sample)",
        **left_out,
    }
    val = [dict(r["metrics"]["val"], fold=r["fold"]) for r in fold_results if "val" in r["metrics"]]
    if val:
        metrics["val_per_fold"] = [dict(m, evaluation="held out (the split's val column, never trained on)")
                                   for m in val]
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    timeline = [{k: r[k] for k in ("key", "fold", "worker", "pid", "start", "end")} for r in results]
    (out / "tasks.json").write_text(json.dumps(timeline, indent=2))
    metrics["tasks"] = timeline
    return metrics


def predict_cohort(store, run_dir, out=None, slide_ids=None) -> pd.DataFrame:
    """Score the complete slides of ``store`` (or ``slide_ids``) with the final model of ``run_dir``.

    Writes ``out`` (CSV: slide_id, in_training_set, score columns) when given; returns the table.
    ``in_training_set`` marks the slides the final model trained on: their scores are in-sample
    (they overstate accuracy; the run's ``oof_predictions.csv`` has out-of-fold scores of them),
    and a one-line warning says how many there are.
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
    trained = training_slides(run_dir, bundle)
    frame = pd.DataFrame(rows)
    frame.insert(1, "in_training_set", frame["slide_id"].isin(trained))
    seen = int(frame["in_training_set"].sum())
    if seen:
        warnings.warn(f"{seen} of {len(frame)} scored slides were in the model's training set (slide ids of "
                      f"{bundle.config.get('training_store') or 'its training store'}): their scores are in-sample and "
                      f"overstate accuracy (column in_training_set; out-of-fold scores: {Path(run_dir) / 'oof_predictions.csv'})",
                      InSampleWarning, stacklevel=2)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False)
    return frame


def training_slides(run_dir, bundle: SlideModel | None = None) -> set[str]:
    """The slide ids the final model of ``run_dir`` trained on (its config; for runs written before
    it recorded them, the labelled slides of ``oof_predictions.csv``)."""
    bundle = bundle or SlideModel.load(run_dir)
    if "training_slides" in bundle.config:
        return set(bundle.config["training_slides"])
    oof = Path(run_dir) / "oof_predictions.csv"
    return set(pd.read_csv(oof, dtype={"slide_id": str})["slide_id"]) if oof.exists() else set()


def metrics_summary(metrics: dict) -> str:
    """A one-line human summary of train_cohort's metrics for the CLI: the pooled out-of-fold
    figures, each with its spread over folds (mean ± sd, min-max)."""
    pooled = {k: v for k, v in metrics.get("pooled", {}).items() if isinstance(v, float) and not math.isnan(v)}
    spread = metrics.get("mean_over_folds", {})
    parts = [f"{k}={v:.3f}" + (f" (folds {format_spread(spread[k])})" if isinstance(spread.get(k), dict) else "")
             for k, v in pooled.items()]
    head = f"{metrics['model']} {metrics['task']}, {metrics['n_slides']} slides, {metrics['folds']} folds: "
    if not parts:
        return head + "no cross-validation metrics (final model only)"
    return head + "out-of-fold, pooled over held-out slides: " + ", ".join(parts)
