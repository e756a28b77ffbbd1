"""Slides in: `nic info` and `nic synth`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from nic_pipeline.cli.group import main
from nic_pipeline.cli.types import COUNT, FRACTION, FiniteFloat, POSITIVE, SEED


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--mpp", type=POSITIVE, default=None, help="Override the slide's µm/px.")
def info(slide, as_json, mpp):
    """Describe SLIDE: format, reader, dimensions, pyramid levels, µm/px, vendor."""
    from nic_pipeline.io import open_slide

    with open_slide(slide, mpp=mpp) as opened:
        described = opened.describe()
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for key, value in described.items():
        if key == "levels":
            click.echo("levels:")
            for level in value:
                click.echo(
                    f"  {level['level']}: {level['width']} x {level['height']}"
                    f"  (downsample {level['downsample']:g})"
                )
        else:
            click.echo(f"{key}: {value}")


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--slides", "n_slides", type=COUNT, default=4, show_default=True, help="Slides in the cohort.")
@click.option("--width", type=COUNT, default=8192, show_default=True, help="Level-0 width in px.")
@click.option("--height", type=COUNT, default=8192, show_default=True, help="Level-0 height in px.")
@click.option("--mpp", type=POSITIVE, default=0.5, show_default=True, help="µm/px of level 0.")
@click.option(
    "--lesion-fraction",
    type=FRACTION,
    default=0.05,
    show_default=True,
    help="Lesion area as a fraction of the tissue, on positive slides.",
)
@click.option("--positive-fraction", type=FRACTION, default=0.5, show_default=True, help="Share of positive slides.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option(
    "--texture",
    default="synthetic",
    show_default=True,
    help="'synthetic' (procedural H&E) or 'tiles:DIR' (real tiles: normal tiles as tissue, tumour tiles as lesions).",
)
@click.option("--tile-labels", type=click.Path(exists=True, path_type=Path), default=None,
              help="CSV path,label for --texture tiles:DIR (default: class = parent folder).")
@click.option("--tile-split", default=None,
              help="Rows of a --tile-labels CSV's split column to draw tiles from (default: its training rows; "
                   "'valid': tiles that an encoder trained on the training rows never saw).")
@click.option("--lesion-classes", default=None,
              help="Comma-separated tile classes that count as lesion (default: a guess from the class names).")
@click.option("--pen-marks/--no-pen-marks", default=False, show_default=True, help="Draw pen-mark artifacts.")
@click.option("--artifacts/--no-artifacts", default=False, show_default=True,
              help="Draw tissue folds (darker double-thickness bands).")
@click.option("--tile-mpp", type=POSITIVE, default=None,
              help="µm/px of the --texture tiles (default: known datasets, else 0.5).")
@click.option("--stain-jitter", type=FiniteFloat(min=0, max=1, max_open=True), default=0.0, show_default=True,
              help="Per-slide stain variation: scale the H and E vectors by U(1-s, 1+s) from the seed (0: off).")
def synth(out_dir, n_slides, width, height, mpp, lesion_fraction, positive_fraction, seed, texture,
          tile_labels, tile_split, lesion_classes, pen_marks, artifacts, tile_mpp, stain_jitter):
    """Write a synthetic cohort of pyramidal H&E-like slides, lesion masks and labels.csv."""
    from nic_pipeline.synth import CohortSpec, write_cohort

    spec = CohortSpec(
        n_slides=n_slides,
        width=width,
        height=height,
        mpp=mpp,
        lesion_fraction=lesion_fraction,
        positive_fraction=positive_fraction,
        seed=seed,
        texture=texture,
        tile_labels=tile_labels,
        **({"tile_split": tile_split} if tile_split else {}),
        lesion_classes=tuple(lesion_classes.split(",")) if lesion_classes else None,
        pen_marks=pen_marks,
        artifacts=artifacts,
        tile_mpp=tile_mpp,
        stain_jitter=stain_jitter,
    )
    labels = write_cohort(out_dir, spec, progress=True)
    click.echo(f"wrote {len(labels)} slides and labels.csv to {out_dir}")
