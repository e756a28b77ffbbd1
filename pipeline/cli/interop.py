"""CLAM / TRIDENT feature files: `nic export`, `nic import-h5`."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from nic_pipeline.cli.group import EXISTING_PATH, main


def _positive(ctx, param, value):
    """A finite number above 0, or nothing; one line otherwise."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value} is not a positive number")
    return value


@main.command("export")
@click.argument("store", type=EXISTING_PATH)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for CLAM's layout: h5_files/<slide_id>.h5, pt_files/<slide_id>.pt, left_out.csv.")
@click.option("--format", "fmt", type=click.Choice(["h5"]), default="h5", show_default=True,
              help="h5: CLAM/TRIDENT feature bags (features (N, C), coords (N, 2) level-0 px).")
def export_cmd(store, out_dir, fmt):
    """Write the complete slides of STORE as CLAM/TRIDENT feature files (CLAM's main.py reads OUT
    as its --data_root_dir's feature folder)."""
    from nic_pipeline.compress.interop import LEFT_OUT, export_h5, left_out_slides

    written = export_h5(store, out_dir)
    left_out = left_out_slides(store)
    for slide_id, reason in left_out.items():
        click.echo(f"LEFT OUT {slide_id}: {reason}", err=True)
    click.echo(f"wrote {len(written)} slides to {out_dir}/h5_files and {out_dir}/pt_files"
               + (f"; {len(left_out)} left out, listed in {out_dir / LEFT_OUT}" if left_out else ""))


@main.command("import-h5")
@click.argument("paths", nargs=-1, required=True, type=EXISTING_PATH)
@click.option("--out", "store", required=True, type=click.Path(path_type=Path), help="Grid store to write.")
@click.option("--encoder", default=None,
              help="Name of the encoder that made the features, where the files do not record it.")
@click.option("--mpp", type=float, default=None, callback=_positive,
              help="Level-0 µm/px; overrides what the files and slides say.")
@click.option("--patch-size", type=int, default=None, callback=_positive,
              help="Patch side in level-0 px, where neither the file nor a patches/ file records it.")
@click.option("--patches", "patches_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="CLAM/TRIDENT patches/ folder (patching attributes), when not beside the feature files.")
@click.option("--slides", multiple=True, type=EXISTING_PATH,
              help="The slides (files or folders): their size makes the grid cover them, their µm/px is used.")
@click.option("--snap", is_flag=True,
              help="Move patches off the main lattice (CLAM: other tissue pieces) to their nearest cell.")
def import_cmd(paths, store, encoder, mpp, patch_size, patches_dir, slides, snap):
    """Place CLAM/TRIDENT feature bags (.h5 files, or folders of them) on a grid store that nic train
    and nic view read."""
    from nic_pipeline.compress.interop import import_h5

    report = import_h5(paths, store, encoder, mpp=mpp, patch_size=patch_size, patches_dir=patches_dir,
                       slides=list(slides) or None, snap=snap)
    for path, reason in report.refused.items():
        click.echo(f"REFUSED {path}: {reason}", err=True)
    click.echo(f"imported {len(report.imported)} slides into {store}"
               + (f"; {len(report.refused)} refused" if report.refused else ""))
    if report.refused:
        sys.exit(1)
