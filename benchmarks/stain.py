"""Does stain normalisation at compression help on a cohort that mixes stains?

One synthetic cohort is written twice from one seed: with the slides' own stains (jitter 0) and
with a per-slide stain jitter (`nic synth --stain-jitter`), so tissue, lesions and labels are the
same and only the stains differ. The jittered cohort is compressed without normalisation and
with each method (target: the cohort's median stain), the plain one without; each store is
cross-validated with a few slide models on the slides that every store holds, and the pooled
out-of-fold AUCs are compared. The cost of normalisation is timed per patch beside the encoder's.

    nice -n 10 python benchmarks/stain.py --work /tmp/stain-bench
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd

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
    from pipeline.synth import CohortSpec, write_cohort

    if not (folder / "labels.csv").exists():
        write_cohort(folder, CohortSpec(n_slides=slides, width=size, height=size, lesion_fraction=fraction,
                                        seed=seed, stain_jitter=jitter))
    return folder / "labels.csv"


def patch_costs(slide_path: Path, n: int = 256) -> dict:
    """ms per 128 px patch of each normalisation and of the encoder (one thread, this CPU)."""
    import torch

    from pipeline.compress.encode import EncoderSettings, NicWorker
    from pipeline.compress.stain import fit_stain, normalise
    from pipeline.io import open_slide

    torch.set_num_threads(1)
    with open_slide(slide_path) as slide:
        region = slide.read_region((1024, 1024), (2048, 2048), 0)[..., :3]
    patches = np.ascontiguousarray(region.reshape(16, 128, 16, 128, 3).swapaxes(1, 2).reshape(-1, 128, 128, 3)[:n])
    costs = {}
    for method in ("macenko", "reinhard"):
        stain = fit_stain(method, patches)
        normalise(patches[:8], stain, stain)
        t = time.perf_counter()
        normalise(patches, stain, stain)
        costs[method] = 1e3 * (time.perf_counter() - t) / len(patches)
    encoder = NicWorker().encoder(EncoderSettings(precision="auto", device="cpu"))
    encoder.encode(patches[:16])
    t = time.perf_counter()
    encoder.encode(patches)
    costs["encoder"] = 1e3 * (time.perf_counter() - t) / len(patches)
    return costs


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
    from pipeline.classify import train_cohort
    from pipeline.compress.encode import EncoderSettings
    from pipeline.compress.graph import compress
    from pipeline.compress.jobs import plan_jobs
    from pipeline.compress.store import list_slides
    from pipeline.runtime.cluster import connect

    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["spec"] = dict(slides=slides, size=size, fraction=fraction, jitter=jitter, seed=seed, folds=folds,
                           cpu="Intel(R) Xeon(R) Processor, 2 shared vCPUs", nice=os.nice(0))
    t = time.time()
    labels = {name: synthesize(work / name, slides, size, fraction, j, seed)
              for name, j in (("plain", 0.0), ("mixed", jitter))}
    log(f"cohorts ready ({time.time() - t:.0f} s)")
    with connect(workers=workers, dashboard=False) as client:
        stores = {}
        for run, (cohort, method) in RUNS.items():
            stores[run] = work / f"{run}.zarr"
            t = time.time()
            report = compress(plan_jobs([work / cohort]), stores[run], client, EncoderSettings(), block=64,
                              progress=False, stain_norm=method, stain_target=None if method == "none" else "cohort")
            results.setdefault("compress", {})[run] = {
                "seconds": round(time.time() - t, 1), "patches": report.patches,
                "failed": sorted(s.slide_id for s in report.failed)}
            log(f"{run}: {report.patches} patches, {len(report.failed)} failed ({time.time() - t:.0f} s)")
        common = sorted(set.intersection(*(set(list_slides(s)) for s in stores.values())))
        table = pd.read_csv(labels["plain"])
        table = table[table.slide_id.isin(common)]
        results["slides_used"] = {"n": len(table), "positives": int(table.label.sum())}
        for run, store in stores.items():
            for model in models.split(","):
                t = time.time()
                metrics = train_cohort(store, table[["slide_id", "label"]], work / "runs" / run / model, model=model,
                                       folds=folds, client=client, seed=seed)
                pooled = metrics["pooled"]
                results.setdefault("auc", {}).setdefault(run, {})[model] = round(pooled["auc"], 3)
                log(f"{run} {model}: pooled AUC {pooled['auc']:.3f} ({time.time() - t:.0f} s)")
                results_path.write_text(json.dumps(results, indent=2))
    results["ms_per_patch"] = {k: round(v, 2) for k, v in patch_costs(next((work / "mixed").glob("*.tif"))).items()}
    log(f"cost per patch: {results['ms_per_patch']}")
    results_path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
