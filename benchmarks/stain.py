"""Does stain normalisation at compression help on a cohort that mixes stains?

One synthetic cohort is written twice from one seed: with the slides' own stains (jitter 0) and
with a per-slide stain jitter (`nic synth --stain-jitter`), so tissue, lesions and labels are the
same and only the stains differ. The jittered cohort is compressed without normalisation and
with each method (target: the cohort's median stain), the plain one without; each store is
cross-validated with a few slide models on the slides that every store holds, and the pooled
out-of-fold AUCs are compared. The cost of normalisation is timed per patch beside the encoder's.

Two measures of the codes go beside the AUCs, less noisy than an AUC on 30 slides: how far a
cell's code moves from the same cell's code in the unjittered cohort (relative L2, median over
cells), and how much the slides' mean codes spread relative to the spread of cells. Finished
steps are skipped on a rerun; results go to WORK/results.json and docs/stain-benchmark.json.

    nice -n 10 python benchmarks/stain.py --work /tmp/stain-bench
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

DOC_JSON = Path(__file__).resolve().parents[1] / "docs" / "stain-benchmark.json"
RUNS = {  # store name -> (cohort, --stain-norm)
    "plain-none": ("plain", "none"),
    "mixed-none": ("mixed", "none"),
    "mixed-macenko": ("mixed", "macenko"),
    "mixed-reinhard": ("mixed", "reinhard"),
}


def log(msg: str) -> None:
    click.echo(f"{time.strftime('%H:%M:%S')} {msg}")
    sys.stdout.flush()


def synthesize(folder: Path, slides: int, size: int, fraction: float, jitter: float, seed: int) -> Path:
    from nic_pipeline.synth import CohortSpec, write_cohort

    if not (folder / "labels.csv").exists():
        write_cohort(folder, CohortSpec(n_slides=slides, width=size, height=size, lesion_fraction=fraction,
                                        seed=seed, stain_jitter=jitter))
    return folder / "labels.csv"


def patch_costs(slide_path: Path, n: int = 256) -> dict:
    """ms per 128 px patch of each normalisation and of the encoder (one thread, this CPU)."""
    import torch

    from nic_pipeline.compress.encode import EncoderSettings, NicWorker
    from nic_pipeline.compress.stain import fit_stain, normalise
    from nic_pipeline.io import open_slide

    torch.set_num_threads(1)
    with open_slide(slide_path) as slide:
        region = slide.read_region((1024, 1024), (2048, 2048), 0)[..., :3]
    patches = np.ascontiguousarray(region.reshape(16, 128, 16, 128, 3).swapaxes(1, 2).reshape(-1, 128, 128, 3)[:n])
    encoder = NicWorker().encoder(EncoderSettings(precision="auto", device="cpu"))
    work = {"encoder": encoder.encode}
    for method in ("macenko", "reinhard"):
        work[method] = functools.partial(normalise, source=fit_stain(method, patches), target=fit_stain(method, patches))
    return {name: 1e3 * best_seconds(step, patches) / len(patches) for name, step in work.items()}


def best_seconds(step, patches, repeats: int = 3) -> float:
    """The fastest of a few timed runs after a warm-up (the cores are shared: the least disturbed)."""
    step(patches[:16])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step(patches)
        times.append(time.perf_counter() - t)
    return min(times)


def bootstrap_auc(work: Path, model: str = "mean", n: int = 2000, seed: int = 0) -> dict:
    """95 % bootstrap intervals (slides resampled) of each run's pooled out-of-fold AUC and of each
    method's gain over no normalisation, with the share of resamples where it gains nothing."""
    oof = {run: pd.read_csv(work / "runs" / run / model / "oof_predictions.csv").set_index("slide_id").sort_index()
           for run in RUNS}
    labels = oof["plain-none"].label.to_numpy()
    rng = np.random.default_rng(seed)
    draws = {run: [] for run in RUNS}
    for _ in range(n):
        pick = rng.choice(len(labels), len(labels))
        if labels[pick].min() == labels[pick].max():
            continue
        for run in RUNS:
            draws[run].append(roc_auc_score(labels[pick], oof[run].score.to_numpy()[pick]))
    out = {run: {"auc_ci95": _interval(draws[run])} for run in RUNS}
    for run in ("mixed-macenko", "mixed-reinhard"):
        gain = np.subtract(draws[run], draws["mixed-none"])
        out[run].update(gain_ci95=_interval(gain), share_no_gain=round(float((gain <= 0).mean()), 3))
    return out


def _interval(values) -> list[float]:
    return [round(float(np.percentile(values, q)), 3) for q in (2.5, 97.5)]


def code_spread(stores: dict[str, Path], slide_ids: list[str]) -> dict:
    """Per run: the median relative move of a cell's code from the same cell of the unjittered
    cohort, and the spread (std summed over features) of slide-mean codes over that of cells."""
    from nic_pipeline.compress.store import open_slide_tensor

    codes = {run: {s: open_slide_tensor(store, s)["features"].values.astype(np.float32) for s in slide_ids}
             for run, store in stores.items()}
    out = {}
    for run in stores:
        encoded = {s: np.abs(f).sum(axis=0) > 0 for s, f in codes[run].items()}
        means = np.stack([f[:, encoded[s]].mean(axis=1) for s, f in codes[run].items()])
        cells = np.concatenate([f[:, encoded[s]] for s, f in codes[run].items()], axis=1)
        out[run] = {"slide_spread_over_cell_spread": round(float(means.std(axis=0).sum() / cells.std(axis=1).sum()), 3)}
        if run != "plain-none":
            moves = []
            for s, f in codes[run].items():
                plain = codes["plain-none"][s]
                both = encoded[s] & (np.abs(plain).sum(axis=0) > 0)
                moves.append(np.linalg.norm(f[:, both] - plain[:, both], axis=0) / np.linalg.norm(plain[:, both], axis=0))
            out[run]["cell_code_move_vs_plain"] = round(float(np.median(np.concatenate(moves))), 3)
    return out


@click.command()
@click.option("--work", type=click.Path(path_type=Path), required=True)
@click.option("--slides", default=32, show_default=True)
@click.option("--size", default=4096, show_default=True)
@click.option("--fraction", default=0.02, show_default=True)
@click.option("--jitter", default=0.3, show_default=True)
@click.option("--models", default="mean,abmil", show_default=True)
@click.option("--folds", default=4, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(work: Path, slides: int, size: int, fraction: float, jitter: float, models: str, folds: int, workers: int,
         seed: int):
    from nic_pipeline.classify import train_cohort
    from nic_pipeline.compress.encode import EncoderSettings
    from nic_pipeline.compress.graph import compress
    from nic_pipeline.compress.jobs import plan_jobs
    from nic_pipeline.compress.catalog import list_slides
    from nic_pipeline.runtime.cluster import connect

    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["spec"] = dict(slides=slides, size=size, fraction=fraction, jitter=jitter, seed=seed, folds=folds,
                           cpu="Intel(R) Xeon(R) Processor, 2 shared vCPUs", nice=os.nice(0))

    def save():
        results_path.write_text(json.dumps(results, indent=2))

    t = time.time()
    labels = {name: synthesize(work / name, slides, size, fraction, j, seed)
              for name, j in (("plain", 0.0), ("mixed", jitter))}
    log(f"cohorts ready ({time.time() - t:.0f} s)")
    stores = {run: work / f"{run}.zarr" for run in RUNS}
    with connect(workers=workers, dashboard=False) as client:
        for run, (cohort, method) in RUNS.items():
            if run in results.get("compress", {}):
                continue
            t = time.time()
            report = compress(plan_jobs([work / cohort]), stores[run], client, EncoderSettings(), block=64,
                              progress=False, stain_norm=method, stain_target=None if method == "none" else "cohort")
            results.setdefault("compress", {})[run] = {
                "seconds": round(time.time() - t, 1), "patches": report.patches,
                "failed": sorted(s.slide_id for s in report.failed)}
            log(f"{run}: {report.patches} patches, {len(report.failed)} failed ({time.time() - t:.0f} s)")
            save()
        common = sorted(set.intersection(*(set(list_slides(s)) for s in stores.values())))
        table = pd.read_csv(labels["plain"])
        table = table[table.slide_id.isin(common)]
        results["slides_used"] = {"n": len(table), "positives": int(table.label.sum())}
        for run, store in stores.items():
            for model in models.split(","):
                if model in results.get("auc", {}).get(run, {}):
                    continue
                t = time.time()
                metrics = train_cohort(store, table[["slide_id", "label"]], work / "runs" / run / model, model=model,
                                       folds=folds, client=client, seed=seed)
                results.setdefault("auc", {}).setdefault(run, {})[model] = round(metrics["pooled"]["auc"], 3)
                log(f"{run} {model}: pooled AUC {metrics['pooled']['auc']:.3f} ({time.time() - t:.0f} s)")
                save()
    results["bootstrap_mean_pooling"] = bootstrap_auc(work, "mean", seed=seed)
    results["codes"] = code_spread(stores, common)
    results["ms_per_patch"] = {k: round(v, 2) for k, v in patch_costs(work / "mixed" / f"{common[0]}.tif").items()}
    log(f"cost per patch: {results['ms_per_patch']}")
    save()
    DOC_JSON.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
