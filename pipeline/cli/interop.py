"""CLAM / TRIDENT feature files: `nic export`, `nic import-h5`."""

from __future__ import annotations

from pathlib import Path

import click

from nic_pipeline.cli.group import EXISTING_PATH, main


@main.command("export")
@click.argument("store", type=EXISTING_PATH)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for <slide_id>.h5.")
@click.option("--format", "fmt", type=click.Choice(["h5"]), default="h5", show_default=True,
              help="h5: CLAM/TRIDENT feature bags (features (N, C), coords (N, 2) level-0 px).")
def export_cmd(store, out_dir, fmt):
    """Write the complete slides of STORE as CLAM/TRIDENT feature files."""
    from nic_pipeline.compress.interop import export_h5

    click.echo(f"wrote {len(export_h5(store, out_dir))} slides to {out_dir}")


@main.command("import-h5")
@click.argument("files", nargs=-1, required=True, type=EXISTING_PATH)
@click.option("--out", "store", required=True, type=click.Path(path_type=Path), help="Grid store to write.")
@click.option("--encoder", required=True, help="Name of the encoder that made the features (recorded).")
@click.option("--mpp", type=float, default=None, help="Level-0 µm/px, where the files do not say it.")
def import_cmd(files, store, encoder, mpp):
    """Place CLAM/TRIDENT feature bags (.h5) on a grid store that nic train and nic view read."""
    from nic_pipeline.compress.interop import import_h5

    click.echo(f"imported {len(import_h5(files, store, encoder, mpp=mpp))} slides into {store}")
