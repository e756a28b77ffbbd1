"""Pictures before a run: `nic preview` (tissue mask and patch grid over the thumbnail)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nic_pipeline.cli.group import main
from nic_pipeline.cli.types import COUNT, FRACTION, POSITIVE


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the PNGs.")
@click.option("--encoder", default="nic", show_default=True, help="The encoder `nic compress` will run (its grid).")
@click.option("--stride", type=COUNT, default=None, help="Px between patches, as for `nic compress --stride`.")
@click.option("--min-tissue", type=FRACTION, default=None,
              help="Tissue fraction a cell's patch needs to be encoded (default: nic compress's).")
@click.option("--mpp", type=POSITIVE, default=None, help="µm/px for slides whose metadata has none.")
@click.option("--force-mpp", is_flag=True, help="Use --mpp even where the metadata has a µm/px.")
def preview(paths, out_dir, encoder, stride, min_tissue, mpp, force_mpp):
    """Draw the tissue mask and patch grid `nic compress` would use over each slide's thumbnail."""
    from nic_pipeline.compress.grid import DEFAULT_MIN_TISSUE
    from nic_pipeline.viz.preview import preview_slides

    previews, failed = preview_slides(paths, out_dir, mpp=mpp, force_mpp=force_mpp, encoder=encoder, stride=stride,
                                      min_tissue=DEFAULT_MIN_TISSUE if min_tissue is None else min_tissue)
    for shown in previews:
        ny, nx = shown.grid_shape
        click.echo(f"{shown.png}: {shown.cells_to_encode} of {ny * nx} cells to encode "
                   f"({ny} x {nx} grid, {shown.mpp:g} µm/px from {shown.mpp_source})")
    for path, reason in failed:
        click.echo(f"FAILED {path}: {reason}", err=True)
    if failed:
        sys.exit(1)
