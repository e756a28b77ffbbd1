"""`nic demo`: the whole mission on the embedded default, in a few minutes on a laptop.

synthesize a cohort -> compress it on a local Dask cluster -> draw the compressed slides ->
cross-validate a slide classifier -> out-of-fold heatmaps scored against the true lesion masks
(every number the demo prints is out of fold: no slide is scored or explained by a model that
trained on it).
Every step skips what an earlier run already finished, like the pipeline itself, and says so: a
rerun of a finished demo only prints its results again (and starts no cluster). A step whose inputs
changed (another model, folds or seed; slides missing from the store) is redone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import pandas as pd

from nic_models.slide_models.registry import DEFAULT_SLIDE_MODEL
from nic_pipeline.classify import list_store_slides, train_cohort
from nic_pipeline.classify.explain import explain_cohort
from nic_pipeline.compress.graph import compress
from nic_pipeline.compress.jobs import plan_jobs
from nic_pipeline.runtime.cluster import connect
from nic_pipeline.synth import CohortSpec, write_cohort
from nic_pipeline.viz.views import save_store_views


@dataclass(frozen=True)
class DemoSpec:
    """Cohort and model of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    slides: int = 16
    size: int = 4096
    lesion_fraction: float = 0.2
    seed: int = 0
    model: str = DEFAULT_SLIDE_MODEL
    folds: int = 4
    workers: int | None = None


def synthesize(slides_dir: Path, spec: DemoSpec) -> Path:
    """The synthetic cohort (slides, lesion masks, labels.csv); reused when already there."""
    labels = slides_dir / "labels.csv"
    if not labels.exists():
        cohort = CohortSpec(n_slides=spec.slides, width=spec.size, height=spec.size, mpp=0.5,
                            lesion_fraction=spec.lesion_fraction, positive_fraction=0.5, seed=spec.seed,
                            texture="synthetic", tile_labels=None, lesion_classes=None, pen_marks=False)
        write_cohort(slides_dir, cohort, progress=True)
    return labels


def _skipped(step: str, what: str) -> None:
    click.secho(f"{step} {what}: already done by an earlier run, skipped", bold=True)


def _finished_training(run_dir: Path, spec: DemoSpec) -> dict | None:
    """The metrics of an earlier training run of the same model, folds and seed, else None."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    same = (metrics.get("model") == spec.model and metrics.get("folds") == spec.folds
            and metrics.get("params", {}).get("seed") == spec.seed and (run_dir / "model.safetensors").exists())
    return metrics if same else None


def _finished_heatmaps(heatmaps: Path, run_dir: Path):
    """The table of heatmaps written after the run's model, else None."""
    table, model = heatmaps / "heatmaps.csv", run_dir / "model.safetensors"
    if table.exists() and (heatmaps / "heatmaps.json").exists() and table.stat().st_mtime >= model.stat().st_mtime:
        return pd.read_csv(table, dtype={"slide_id": str})
    return None


def run_demo(out_dir: Path, spec: DemoSpec = DemoSpec()) -> dict:
    """Run every step into ``out_dir``, skipping those an earlier run finished; returns the
    cross-validated (out-of-fold) metrics."""
    out_dir = Path(out_dir)
    slides_dir, store = out_dir / "slides", out_dir / "cohort.zarr"
    run_dir, heatmaps, views = out_dir / "run", out_dir / "heatmaps", out_dir / "views"

    if (slides_dir / "labels.csv").exists():
        _skipped("1/5", f"synthesizing slides into {slides_dir}")
    else:
        click.secho(f"1/5 synthesizing {spec.slides} slides of {spec.size:,} px into {slides_dir}", bold=True)
    labels = synthesize(slides_dir, spec)
    slide_ids = pd.read_csv(labels, dtype={"slide_id": str})["slide_id"].tolist()
    compressed = store.exists() and set(slide_ids) <= set(list_store_slides(store))
    drawn = compressed and all((views / f"{sid}.png").exists() for sid in slide_ids)
    metrics = _finished_training(run_dir, spec) if drawn else None
    if metrics is None:
        with connect(workers=spec.workers) as client:
            click.echo(f"dashboard: {client.dashboard_link}")
            if compressed:
                _skipped("2/5", f"compressing into {store}")
            else:
                click.secho(f"2/5 compressing into {store}", bold=True)
                report = compress(plan_jobs([slides_dir]), store, client)
                for failed in report.failed:
                    click.echo(f"FAILED {failed.path}: {failed.error}", err=True)
            if drawn:
                _skipped("3/5", f"drawing compressed slides into {views}")
            else:
                click.secho(f"3/5 drawing compressed slides into {views}", bold=True)
                save_store_views(store, views, [slides_dir])
            click.secho(f"4/5 training {spec.model} with {spec.folds}-fold cross-validation into {run_dir}", bold=True)
            metrics = train_cohort(store, labels, run_dir, model=spec.model, folds=spec.folds, client=client,
                                   seed=spec.seed)
    else:
        for step, what in (("2/5", f"compressing into {store}"), ("3/5", f"drawing compressed slides into {views}"),
                           ("4/5", f"training {spec.model} with {spec.folds}-fold cross-validation into {run_dir}")):
            _skipped(step, what)
    explained = _finished_heatmaps(heatmaps, run_dir)
    if explained is not None:
        _skipped("5/5", f"out-of-fold heatmaps into {heatmaps}")
    else:
        click.secho(f"5/5 out-of-fold heatmaps into {heatmaps} (each slide explained by the fold model that held it "
                    "out)", bold=True)
        explained = explain_cohort(store, run_dir, heatmaps, slides_dir=slides_dir, masks_dir=slides_dir,
                                   out_of_fold=True)
    summary = {"out_of_fold_metrics": metrics.get("pooled", metrics),
               "out_of_fold_heatmap_lesion_auc": _mean_auc(explained)}
    click.echo(json.dumps(summary, indent=2, default=float))
    click.echo(f"pictures: {views}/*.png, {heatmaps}/*.png")
    return summary


def _mean_auc(explained) -> float | None:
    """Mean heatmap-vs-lesion AUC over the slides that have a lesion."""
    if explained is None or "lesion_auc" not in getattr(explained, "columns", []):
        return None
    values = explained["lesion_auc"].dropna()
    return float(values.mean()) if len(values) else None
