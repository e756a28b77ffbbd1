"""Codes to slide labels: `nic train`, `nic predict`, `nic heatmap`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from nic_pipeline.cli.cluster import _connect_options, cluster_options
from nic_pipeline.cli.group import EXISTING_PATH, default_slide_model, main
from nic_pipeline.cli.types import COUNT, SEED
from nic_pipeline.errors import NicError


def _parse_params(pairs) -> dict:
    """KEY=VALUE pairs -> dict; values parsed as JSON where they can be (numbers, true/false)."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise NicError(f"--param {pair!r}: expected KEY=VALUE, e.g. steps=500")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


@main.command("train")
@click.argument("store", type=EXISTING_PATH)
@click.option("--labels", required=True, type=EXISTING_PATH,
              help="CSV slide_id,label[,group] (survival: slide_id,time,event[,group]).")
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory to write.")
@click.option("--model", default=default_slide_model,
              help="A registered slide model: nic-cnn, abmil, mean, max, topk, dsmil, clam-sb, transmil, local-max "
                   "(docs/classify.md; default: abmil, the registry's DEFAULT_SLIDE_MODEL).")
@click.option("--task", type=click.Choice(["binary", "multiclass", "regression", "survival"]), default="binary",
              show_default=True)
@click.option("--folds", type=click.IntRange(min=0), default=5, show_default=True, help="Cross-validation folds (<2: final model only).")
@click.option("--splits", type=EXISTING_PATH, default=None,
              help="Fixed splits instead of --folds: a CLAM splits_K.csv (columns train,val,test of slide ids) or a "
                   "folder of them; fold K trains on train, is scored on test (val reported apart).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--param", "params", multiple=True, help="Override a hyper-parameter, KEY=VALUE (e.g. steps=500); repeatable.")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler.")
@click.option("--scheduler-file", type=click.Path(path_type=Path), default=None, help="Dask scheduler file.")
@click.option("--workers", type=COUNT, default=None, help="Workers of the local cluster (no scheduler named).")
@cluster_options
def train_cmd(store, labels, run_dir, model, task, folds, splits, seed, params, scheduler, scheduler_file, workers,
              **cluster):
    """Cross-validate a slide-level model on compressed STORE, then train the final model.

    The metrics printed and written are out-of-fold (each slide scored by a model that did not
    train on it), with their spread over folds."""
    from nic_pipeline.classify import metrics_summary
    from nic_pipeline.classify.api import train
    from nic_pipeline.runtime.cluster import connect

    scheduler_file = str(scheduler_file) if scheduler_file else None
    with connect(scheduler, scheduler_file, workers, **_connect_options(**cluster)) as client:
        click.echo(f"dashboard: {client.dashboard_link}")
        metrics = train(store, labels, run_dir, client, model=model, task=task, folds=folds, seed=seed,
                        params=_parse_params(params), splits=splits,
                        wait_workers=1 if (scheduler or scheduler_file or cluster["batch_system"]) else 0)
    click.echo(metrics_summary(metrics))
    click.echo(f"wrote {run_dir}/metrics.json (out-of-fold metrics), oof_predictions.csv (out-of-fold scores), "
               f"splits/ (each fold's slides, CLAM's splits_K.csv) and the final model")


@main.command("predict")
@click.argument("store", type=EXISTING_PATH)
@click.option("--model", "run_dir", required=True, type=EXISTING_PATH, help="Run directory from `nic train`.")
@click.option("--out", "out_csv", required=True, type=click.Path(path_type=Path), help="Predictions CSV.")
def predict_cmd(store, run_dir, out_csv):
    """Score the complete slides of STORE with the final model of a run.

    Slides the model trained on are marked (column in_training_set): their scores are in-sample."""
    import warnings

    from nic_pipeline.classify import predict_cohort
    from nic_pipeline.classify.graph import InSampleWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InSampleWarning)  # said below, in the command's one line
        frame = predict_cohort(store, run_dir, out_csv)
    seen = int(frame["in_training_set"].sum())
    click.echo(f"scored {len(frame)} slides -> {out_csv}" + (
        f"; {seen} of them were in the model's training set: their scores are in-sample and overstate accuracy "
        f"(column in_training_set; out-of-fold scores in {run_dir}/oof_predictions.csv)" if seen
        else "; none was in the model's training set"))


@main.command("heatmap")
@click.argument("store", type=EXISTING_PATH)
@click.option("--model", "run_dir", required=True, type=EXISTING_PATH, help="Run directory from `nic train`.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--slides", "slides_dir", type=EXISTING_PATH, default=None,
              help="Directory of the slide files (thumbnails; <slide_id>_lesion.png masks for heatmap AUC); "
                   "default: the source paths the store recorded.")
@click.option("--masks", "masks_dir", type=EXISTING_PATH, default=None,
              help="Directory of <slide_id>_lesion.png masks (default: --slides).")
@click.option("--out-of-fold", is_flag=True,
              help="Explain each slide of the run's cross-validation by the fold model that held it out "
                   "(default: the final model, in-sample on its training slides).")
@click.option("--fine-store", type=EXISTING_PATH, default=None,
              help="The same slides compressed at a smaller --stride (e.g. 64): score on STORE, draw the map "
                   "from this finer grid (bag models).")
@click.option("--geojson", is_flag=True, help="Also write qupath/<slide_id>.geojson: cells with their scores, for QuPath.")
@click.option("--overlay", is_flag=True, help="Also write overlay/<slide_id>.tif: the heatmap as a pyramidal TIFF.")
def heatmap_cmd(store, run_dir, out_dir, slides_dir, masks_dir, out_of_fold, fine_store, geojson, overlay):
    """Explanation heatmap PNG per slide (Grad-CAM / attention / linear contribution) beside PCA-RGB."""
    from nic_pipeline.classify.explain import EVALUATION_TEXT, explain_cohort, lesion_auc_summary

    frame = explain_cohort(store, run_dir, out_dir, slides_dir=slides_dir, masks_dir=masks_dir,
                           out_of_fold=out_of_fold, fine_store=fine_store, geojson=geojson, overlay=overlay)
    kinds = frame["evaluation"].value_counts()
    click.echo(f"wrote {len(frame)} heatmaps to {out_dir} ("
               + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + ")")
    for kind, auc in lesion_auc_summary(frame).items():
        click.echo(f"{kind} heatmap AUC vs lesion: median {auc['median']:.3f}, min {auc['min']:.3f} "
                   f"over {auc['n_slides']} slides ({EVALUATION_TEXT[kind]})")
