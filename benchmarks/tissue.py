"""Tissue detection: recall and precision of the tissue cells against known masks, old vs new.

Usage::

    python benchmarks/tissue.py synth --out /tmp/tissue-bench [--seeds 7 11 23] [--jitters 0 0.2 0.4]
    python benchmarks/tissue.py cohort DIR [DIR ...]          # cohorts written by `nic synth`
    python benchmarks/tissue.py real [--shared ../shared/data]
    python benchmarks/tissue.py speed [--size 3072]

Every command runs the detector of this checkout (``new``) and the one of ``--baseline`` (a git
revision, default the last commit before the pale-stain change; its tissue.py is loaded from git
into a module of its own) on the same images.

Synthetic cohorts (``nic synth``) write ``synth_NNN_tissue.png`` beside each slide (one pixel per
``MASK_DOWNSAMPLE`` level-0 px, read with ``nic_pipeline.synth.read_tissue_mask``). The measure is
the one compression acts on: the grid of 64 µm cells (128 px at 0.5 µm/px) and the pipeline's
default ``min_tissue`` of 0.1. A cell is

* *tissue* when the true mask covers at least half of it,
* *detected* when the detected mask covers at least ``min_tissue`` of it (it is encoded),
* a *true detection* when the true mask covers at least ``min_tissue`` of it too;

recall = tissue cells detected / tissue cells, precision = true detections / detected cells.

``real``: the real fixture crops of ../shared/data/tiles/tissue_fixtures, whose names say tissue
or no tissue (the per-image bounds of tests/compress/test_tissue.py), and the two real slides
(tissue fraction; no true mask exists for them). ``speed``: seconds per mask of a mosaic of
synthetic thumbnails of ``--size``² px at 8 µm/px (a 48,000² px slide at 0.5 µm/px), best of 5.
"""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from nic_pipeline.compress import tissue as new
from nic_pipeline.compress.grid import cell_coverage
from nic_pipeline.io import open_slide
from nic_pipeline.synth import MASK_DOWNSAMPLE, CohortSpec, read_tissue_mask, write_cohort

REPO = Path(__file__).resolve().parents[1]
BASELINE = "29bc29a"  # main before the pale-stain change (issue 21)
CELL_UM = 64.0
MIN_TISSUE = 0.1


def load_baseline(rev: str):
    """pipeline/compress/tissue.py at git revision ``rev`` as a module of its own."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:pipeline/compress/tissue.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"tissue_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"tissue_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cell_scores(pred_mask, mask_mpp, truth, truth_mpp, shape):
    """(tissue cells, detected cells, recall, precision) on the CELL_UM grid (see the module doc)."""
    true_cov = cell_coverage(truth, truth_mpp, CELL_UM, shape)
    pred_cov = cell_coverage(pred_mask, mask_mpp, CELL_UM, shape)
    tissue, detected = true_cov >= 0.5, pred_cov >= MIN_TISSUE
    recall = (tissue & detected).sum() / max(tissue.sum(), 1)
    precision = (detected & (true_cov >= MIN_TISSUE)).sum() / max(detected.sum(), 1)
    return int(tissue.sum()), int(detected.sum()), float(recall), float(precision)


def score_cohort(directory: Path, detectors: dict, mask_mpp: float = 8.0):
    """One row per slide and detector: tissue cells, detected cells, recall, precision, seconds."""
    rows = []
    for path in sorted(directory.glob("synth_*.tif")):
        truth = read_tissue_mask(path)
        with open_slide(path) as slide:
            image = new.slide_image_at_mpp(slide, mask_mpp)
            truth_mpp = MASK_DOWNSAMPLE * slide.mpp
            w, h = slide.dimensions
            shape = (int(np.ceil(h * slide.mpp / CELL_UM)), int(np.ceil(w * slide.mpp / CELL_UM)))
        for name, module in detectors.items():
            start = time.perf_counter()
            mask = module.tissue_mask(image, mpp=mask_mpp)
            seconds = time.perf_counter() - start
            rows.append((path.stem, name, *cell_scores(mask, mask_mpp, truth, truth_mpp, shape), seconds))
    return rows


def report(rows, label: str):
    names = sorted({r[1] for r in rows}, key=lambda n: n != "old")
    for name in names:
        mine = [r for r in rows if r[1] == name]
        rec = np.array([r[4] for r in mine])
        prec = np.array([r[5] for r in mine])
        print(f"{label} {name}: slides {len(mine)}, recall mean {rec.mean():.3f} min {rec.min():.3f}, "
              f"slides < 0.8: {int((rec < 0.8).sum())}, precision mean {prec.mean():.3f} min {prec.min():.3f}, "
              f"{np.mean([r[6] for r in mine]) * 1e3:.0f} ms/slide")


@click.group()
@click.option("--baseline", default=BASELINE, show_default=True, help="git revision of the old detector")
@click.pass_context
def main(ctx, baseline):
    """Tissue detection measurements for docs/tissue.md."""
    ctx.obj = {"old": load_baseline(baseline), "new": new}
    print(f"CPU: {cpu_name()}; baseline {baseline}")


@main.command()
@click.argument("directories", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--per-slide", is_flag=True)
@click.pass_obj
def cohort(detectors, directories, per_slide):
    """Score cohorts already written by `nic synth`."""
    for directory in directories:
        rows = score_cohort(directory, detectors)
        if per_slide:
            for r in rows:
                print(f"  {r[0]} {r[1]}: tissue cells {r[2]}, detected {r[3]}, recall {r[4]:.3f}, precision {r[5]:.3f}")
        report(rows, directory.name)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="where the cohorts are written")
@click.option("--seeds", type=int, multiple=True, default=(7, 11, 23))
@click.option("--jitters", type=float, multiple=True, default=(0.0, 0.2, 0.4))
@click.option("--slides", type=int, default=12, show_default=True)
@click.option("--size", type=int, default=4096, show_default=True)
@click.pass_obj
def synth(detectors, out, seeds, jitters, slides, size):
    """Write cohorts (as `nic synth --lesion-fraction 0.2`) for each seed and stain jitter, score them."""
    every = []
    for seed in seeds:
        for jitter in jitters:
            directory = out / f"seed{seed}_jitter{jitter:g}_{size}"
            if not (directory / "synth.json").exists():
                write_cohort(directory, CohortSpec(n_slides=slides, width=size, height=size, lesion_fraction=0.2,
                                                   seed=seed, stain_jitter=jitter))
            rows = score_cohort(directory, detectors)
            report(rows, directory.name)
            every += rows
    report(every, "all")


@main.command()
@click.option("--shared", type=click.Path(path_type=Path), default=REPO.parent / "shared" / "data")
@click.pass_obj
def real(detectors, shared):
    """Real fixture crops (bounds from their names and tests) and the two real slides."""
    sys.path.insert(0, str(REPO))
    from skimage import io

    from tests.compress.test_tissue import BLANK, PEN, TISSUE, fixture_mpp

    folder = shared / "tiles" / "tissue_fixtures"
    bounds = {**{n: (0.0, 0.01) for n in BLANK}, **TISSUE, **PEN}
    for name, module in detectors.items():
        inside, kept = 0, []
        for fixture, (low, high) in sorted(bounds.items()):
            f = float(module.tissue_mask(io.imread(folder / fixture), mpp=fixture_mpp(fixture)).mean())
            inside += low <= f <= high
            if fixture in BLANK:
                kept.append(f)
        print(f"fixtures {name}: {inside}/{len(bounds)} within their bounds; blank crops: at most "
              f"{max(kept):.3f} called tissue")
        for slide_name, mpp in (("CMU-1-Small-Region.svs", None), ("TCGA-CR-7395-01A-01-TS1.svs", 0.25)):
            with open_slide(shared / "slides" / slide_name, mpp=mpp) as slide:
                image = new.slide_image_at_mpp(slide, 8.0)
            start = time.perf_counter()
            mask = module.tissue_mask(image, mpp=8.0)
            print(f"  {slide_name} {name}: tissue {mask.mean():.3f} ({time.perf_counter() - start:.2f} s)")


@main.command()
@click.option("--size", type=int, default=3072, show_default=True)
@click.option("--rounds", type=int, default=5, show_default=True)
@click.option("--cohort-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="a `nic synth` cohort whose 8 µm/px thumbnails are tiled into the mosaic")
@click.pass_obj
def speed(detectors, size, rounds, cohort_dir):
    """Seconds per mask of a size² mosaic at 8 µm/px (wall and process CPU time, best of ``rounds``),
    old and new on the same image. On a shared machine the CPU time is the steadier figure."""
    thumbs = []
    for path in sorted(cohort_dir.glob("synth_*.tif")):
        with open_slide(path) as slide:
            thumbs.append(new.slide_image_at_mpp(slide, 8.0))
    th, tw = thumbs[0].shape[:2]
    rows = [np.concatenate([thumbs[(i * 7 + j) % len(thumbs)] for j in range(-(-size // tw))], axis=1)
            for i in range(-(-size // th))]
    image = np.ascontiguousarray(np.concatenate(rows, axis=0)[:size, :size])
    times = {name: [] for name in detectors}
    cpu = {name: [] for name in detectors}
    for _ in range(rounds):  # interleaved, so that a change in the machine's load hits both alike
        for name, module in detectors.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            module.tissue_mask(image, mpp=8.0)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    for name, module in detectors.items():
        print(f"speed {name}: {size}² px mask in {min(times[name]):.2f} s wall, {min(cpu[name]):.2f} s CPU "
              f"(best of {rounds}), tissue {module.tissue_mask(image, mpp=8.0).mean():.3f}")

if __name__ == "__main__":
    main()
