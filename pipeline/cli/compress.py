"""Slides to codes: `nic compress`, `nic inspect`, `nic view`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from nic_pipeline.cli.cluster import _connect_options, cluster_options
from nic_pipeline.cli.group import EXISTING_PATH, main
from nic_pipeline.cli.types import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, SEED
from nic_pipeline.compress.grid import DEFAULT_BLOCK, DEFAULT_MIN_TISSUE


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "store", required=True, type=click.Path(path_type=Path), help="Output Zarr store (one per cohort).")
@click.option("--workers", type=COUNT, default=None, help="Workers of the embedded local cluster (default: one per core, or per GPU).")
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler, e.g. tcp://node1:8786.")
@click.option("--scheduler-file", type=click.Path(exists=True), default=None, help="Scheduler file of an existing cluster.")
@click.option("--wait-workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Wait until this many workers have joined before submitting.")
@click.option("--wait-timeout", type=NON_NEGATIVE, default=300, show_default=True, help="Seconds to wait for them.")
@click.option("--encoder", default="nic", show_default=True, help="Encoder name from the registry (see `nic encoders`).")
@click.option("--weights", type=click.Path(exists=True), default=None, help="Local weights file for the encoder.")
@click.option("--random-init", is_flag=True, help="Seeded random weights instead of trained ones.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of --random-init.")
@click.option("--mpp", type=POSITIVE, default=None, help="µm/px for slides whose metadata has none.")
@click.option("--mpp-csv", type=click.Path(exists=True), default=None,
              help="CSV slide_id,mpp: µm/px per slide, for slides whose metadata has none.")
@click.option("--force-mpp", is_flag=True, help="Use --mpp / --mpp-csv even where the metadata has a µm/px.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: each worker picks fp16 on GPUs with tensor cores, bf16 on CPUs with native bf16, else fp32.")
@click.option("--dihedral-mean", is_flag=True, help="Encode each patch as the mean code of its 8 rotations/flips.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where workers decode and encode: auto = the worker's GPU when it has one.")
@click.option("--block", type=COUNT, default=DEFAULT_BLOCK, show_default=True,
              help="Cells per block side: one task and one shard file each.")
@click.option("--stride", type=COUNT, default=None,
              help="Px between patches at the encoder's µm/px (default: the encoder's; 64 with 128 px patches: "
                   "overlapping patches, 4x the cells).")
@click.option("--min-tissue", type=FRACTION, default=DEFAULT_MIN_TISSUE, show_default=True,
              help="Tissue fraction a cell's patch needs to be encoded.")
@click.option("--stain-norm", type=click.Choice(["none", "macenko", "reinhard"]), default="none", show_default=True,
              help="Normalise each slide's stain onto --stain-target before encoding (docs/compress.md).")
@click.option("--stain-target", default=None,
              help="The target stain: a reference slide or image (PNG/JPEG), or 'cohort' (median over the slides).")
@click.option("--verify", is_flag=True, help="Re-read finished slides' shards and check every checksum.")
@click.option("--redo-changed", is_flag=True, help="Compress again slides whose file or µm/px changed.")
@cluster_options
def compress(paths, store, workers, scheduler, scheduler_file, wait_workers, wait_timeout, encoder, weights,
             random_init, seed, mpp, mpp_csv, force_mpp, precision, dihedral_mean, device, block, stride,
             min_tissue, stain_norm, stain_target, verify, redo_changed, **cluster):
    """Compress slides (files or folders) into a Zarr store of per-slide code grids."""
    from nic_models.licences import licence_line
    from nic_models.registry import get_spec
    from nic_pipeline.compress.api import compress as run_compress
    from nic_pipeline.compress.jobs import plan_jobs
    from nic_pipeline.runtime.cluster import connect

    jobs = plan_jobs(paths, mpp=mpp, mpp_csv=mpp_csv, force_mpp=force_mpp)
    if not jobs:
        raise click.UsageError("no slides found under the given paths")
    spec = get_spec(encoder)
    click.echo(f"encoder: {spec.name} (licence: {licence_line(spec.licence, spec.commercial)})")
    with connect(scheduler, scheduler_file, workers, **_connect_options(**cluster)) as client:
        click.echo(f"dashboard: {client.dashboard_link}")
        report = run_compress(jobs, store, client, encoder=encoder, weights=weights, random_init=random_init, seed=seed,
                              precision=precision, dihedral_mean=dihedral_mean, device=device, block=block,
                              stride=stride, min_tissue=min_tissue, stain_norm=stain_norm, stain_target=stain_target,
                              verify=verify, redo_changed=redo_changed,
                              wait_workers=wait_workers if (scheduler or scheduler_file or cluster["batch_system"]) else 0,
                              wait_timeout=wait_timeout)
    _print_compress_report(report)
    if report.failed or report.fatal:
        sys.exit(1)


def _print_compress_report(report) -> None:
    done = sum(s.status in ("complete", "skipped") for s in report.slides)
    rate = report.patches / report.seconds if report.seconds else 0.0
    click.echo(f"{done}/{len(report.slides)} slides complete in {report.store} "
               f"({report.patches} patches encoded in {report.blocks_encoded} blocks this run, "
               f"{report.seconds:.1f} s, {rate:.0f} patches/s)")
    for failed in report.failed:
        click.echo(f"FAILED {failed.path}: {failed.error}", err=True)
    if report.fatal:
        click.echo(f"STOPPED: {report.fatal}; rerun the same command once it is fixed: finished blocks are kept",
                   err=True)


@main.command()
@click.argument("store", type=EXISTING_PATH)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the PNGs.")
@click.option("--slides", "slides_dir", type=EXISTING_PATH, multiple=True,
              help="Folder (or file) of the slides, to draw their thumbnails alongside.")
def view(store, out_dir, slides_dir):
    """Draw each compressed slide as a PCA-RGB picture beside its thumbnail."""
    from nic_pipeline.viz.views import save_store_views

    for path in save_store_views(store, out_dir, list(slides_dir)):
        click.echo(str(path))


@main.command()
@click.argument("store", type=EXISTING_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(store, as_json):
    """List the slides of a store: status, grid shape, tissue cells, encoder."""
    from nic_pipeline.compress.catalog import describe_store

    rows = describe_store(store)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'slide_id':<32} {'status':<12} {'grid (y x)':<12} {'tissue cells':>12}  {'µm/px (from)':<18} "
               "encoder, precision")
    for row in rows:
        grid = "x".join(str(n) for n in row["grid_shape"]) or "-"
        mpp = f"{row['slide_mpp']:g} ({row['mpp_source']})" if row["slide_mpp"] else "-"
        how = f"{row['encoder']}, {'+'.join(row['precisions'])}" if row["encoder"] else "-"
        if row["stride"] and row["stride"] != row["patch_size"]:
            how += f", {row['patch_size']} px patches every {row['stride']} px"
        click.echo(f"{row['slide_id']:<32} {row['status']:<12} {grid:<12} {row['tissue_cells']:>12}  {mpp:<18} {how}")
    for row in rows:
        if row["error"]:
            click.echo(f"FAILED {row['slide_id']}: {row['error']}")
