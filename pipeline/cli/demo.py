"""`nic demo`: the whole pipeline on a synthetic cohort."""

from __future__ import annotations

from pathlib import Path

import click

from nic_pipeline.cli.group import default_slide_model, main
from nic_pipeline.cli.types import COUNT, FRACTION, SEED


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path), default="demo")
@click.option("--slides", "n_slides", type=COUNT, default=16, show_default=True, help="Slides in the synthetic cohort.")
@click.option("--size", type=COUNT, default=4096, show_default=True, help="Side of each slide in px (0.5 µm/px).")
@click.option("--lesion-fraction", type=FRACTION, default=0.2, show_default=True,
              help="Lesion share of the tissue on positive slides.")
@click.option("--model", default=default_slide_model, help="A registered slide model (see `nic train --help`).")
@click.option("--folds", type=click.IntRange(min=0), default=4, show_default=True)
@click.option("--workers", type=COUNT, default=None, help="Workers of the embedded cluster.")
@click.option("--seed", type=SEED, default=0, show_default=True)
def demo(out_dir, n_slides, size, lesion_fraction, model, folds, workers, seed):
    """Synthesize a cohort, compress it, cross-validate a classifier and draw heatmaps."""
    from nic_pipeline.demo import DemoSpec, run_demo

    run_demo(out_dir, DemoSpec(n_slides, size, lesion_fraction, seed, model, folds, workers))
