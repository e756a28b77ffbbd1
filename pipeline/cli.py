"""The `nic` command line.

Each command parses its options and hands over to one module function; the heavy
imports (torch, dask, cuCIM) happen inside the command, so `nic --help` is instant.
Expected failures (:class:`~nic_pipeline.errors.NicError`) print one line and exit 2; Ctrl-C prints
one line and exits 130.
"""

from __future__ import annotations

import gc
import json
import sys
import warnings
from pathlib import Path

import click

from nic_pipeline.errors import NicError

EXISTING_PATH = click.Path(exists=True, path_type=Path)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings for users as one line, without Python's file, line and source."""
    return f"warning: {message}\n"


class NicGroup(click.Group):
    """A click group that turns :class:`NicError` into a one-line message and exit code 2."""

    def invoke(self, ctx):
        warnings.formatwarning = _one_line_warning
        try:
            return super().invoke(ctx)
        except NicError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: run the same command again to go on where it stopped", err=True)
            sys.exit(130)


@click.group(cls=NicGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nic-pipeline")
def main():
    """Neural Image Compression for whole-slide images, on Dask."""


def run() -> None:
    """The ``nic`` command as a process: :func:`main`, then a quick exit. The interpreter's final
    garbage collections walk every object that torch, Dask and a cluster's client made (about a
    second); freezing them first skips that, since the process is ending anyway."""
    try:
        main()
    finally:
        gc.freeze()


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--mpp", type=float, default=None, help="Override the slide's µm/px.")
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
@click.option("--slides", "n_slides", type=int, default=4, show_default=True, help="Slides in the cohort.")
@click.option("--width", type=int, default=8192, show_default=True, help="Level-0 width in px.")
@click.option("--height", type=int, default=8192, show_default=True, help="Level-0 height in px.")
@click.option("--mpp", type=float, default=0.5, show_default=True, help="µm/px of level 0.")
@click.option(
    "--lesion-fraction",
    type=float,
    default=0.05,
    show_default=True,
    help="Lesion area as a fraction of the tissue, on positive slides.",
)
@click.option("--positive-fraction", type=float, default=0.5, show_default=True, help="Share of positive slides.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--texture",
    default="synthetic",
    show_default=True,
    help="'synthetic' (procedural H&E) or 'tiles:DIR' (real tiles: normal tiles as tissue, tumour tiles as lesions).",
)
@click.option("--tile-labels", type=click.Path(exists=True, path_type=Path), default=None,
              help="CSV path,label for --texture tiles:DIR (default: class = parent folder).")
@click.option("--lesion-classes", default=None,
              help="Comma-separated tile classes that count as lesion (default: a guess from the class names).")
@click.option("--pen-marks/--no-pen-marks", default=False, show_default=True, help="Draw pen-mark artifacts.")
@click.option("--artifacts/--no-artifacts", default=False, show_default=True,
              help="Draw tissue folds (darker double-thickness bands).")
@click.option("--tile-mpp", type=float, default=None,
              help="µm/px of the --texture tiles (default: known datasets, else 0.5).")
@click.option("--stain-jitter", type=float, default=0.0, show_default=True,
              help="Per-slide stain variation: scale the H and E vectors by U(1-s, 1+s) from the seed (0: off).")
def synth(out_dir, n_slides, width, height, mpp, lesion_fraction, positive_fraction, seed, texture,
          tile_labels, lesion_classes, pen_marks, artifacts, tile_mpp, stain_jitter):
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
        lesion_classes=tuple(lesion_classes.split(",")) if lesion_classes else None,
        pen_marks=pen_marks,
        artifacts=artifacts,
        tile_mpp=tile_mpp,
        stain_jitter=stain_jitter,
    )
    labels = write_cohort(out_dir, spec, progress=True)
    click.echo(f"wrote {len(labels)} slides and labels.csv to {out_dir}")


@main.command()
def encoders():
    """List the registry's encoders: patch size, stride, µm/px, code size, licence."""
    from nic_models.registry import DEFAULT_ALIAS, DEFAULT_ENCODER, get_spec, list_encoders

    click.echo(f"{'name':<24} {'patch':>5} {'stride':>6} {'µm/px':>6} {'code':>5}  licence")
    for name in list_encoders(include_aliases=False):
        spec = get_spec(name)
        marker = f"  (= {DEFAULT_ALIAS})" if name == DEFAULT_ENCODER else ""
        click.echo(f"{name:<24} {spec.patch_size:>5} {spec.stride:>6} {spec.mpp:>6g} {spec.code_dim:>5}  "
                   f"{(spec.licence or 'weights from your own file').split(';')[0]}{marker}")


def cluster_options(command):
    """Options shared by compress and train: worker jobs on a batch system, and TLS certificates."""
    options = [
        click.option("--cluster", "batch_system", type=click.Choice(["slurm", "pbs"]), default=None,
                     help="Submit worker jobs to this batch system (dask-jobqueue; settings in "
                          "~/.config/dask/jobqueue.yaml)."),
        click.option("--jobs", type=int, default=1, show_default=True,
                     help="Worker jobs (--cluster); the most with --adapt."),
        click.option("--adapt", is_flag=True, help="Scale worker jobs between 1 and --jobs with the load (--cluster)."),
        click.option("--gpus-per-job", type=int, default=1, show_default=True,
                     help="GPUs per worker job, one `dask cuda worker` each (--cluster); 0: CPU worker jobs."),
        click.option("--cpu-jobs", type=int, default=0, show_default=True,
                     help="Extra CPU worker jobs for the CPU-side stages (--cluster; jobqueue.<system>-cpu config)."),
        click.option("--tls/--no-tls", default=True, show_default=True,
                     help="With --cluster and no certificates: TLS with temporary ones."),
        click.option("--tls-ca-file", type=click.Path(exists=True), default=None, help="CA certificate (PEM) for TLS."),
        click.option("--tls-cert", type=click.Path(exists=True), default=None, help="Certificate (PEM) for TLS."),
        click.option("--tls-key", type=click.Path(exists=True), default=None, help="Private key (PEM) for TLS."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _connect_options(batch_system, jobs, adapt, gpus_per_job, cpu_jobs, tls, tls_ca_file, tls_cert, tls_key) -> dict:
    """connect() keywords from the cluster options."""
    from nic_pipeline.runtime.cluster import tls_security
    from nic_pipeline.runtime.jobqueue import BatchSettings

    batch = None
    if batch_system:
        batch = BatchSettings(batch_system, jobs=jobs, adapt=adapt, gpus_per_job=gpus_per_job, cpu_jobs=cpu_jobs, tls=tls)
    return {"security": tls_security(tls_ca_file, tls_cert, tls_key), "batch": batch}


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "store", required=True, type=click.Path(path_type=Path), help="Output Zarr store (one per cohort).")
@click.option("--workers", type=int, default=None, help="Workers of the embedded local cluster (default: one per core, or per GPU).")
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler, e.g. tcp://node1:8786.")
@click.option("--scheduler-file", type=click.Path(exists=True), default=None, help="Scheduler file of an existing cluster.")
@click.option("--wait-workers", type=int, default=1, show_default=True,
              help="Wait until this many workers have joined before submitting.")
@click.option("--wait-timeout", type=float, default=300, show_default=True, help="Seconds to wait for them.")
@click.option("--encoder", default="nic", show_default=True, help="Encoder name from the registry (see `nic encoders`).")
@click.option("--weights", type=click.Path(exists=True), default=None, help="Local weights file for the encoder.")
@click.option("--random-init", is_flag=True, help="Seeded random weights instead of trained ones.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-init.")
@click.option("--mpp", type=float, default=None, help="µm/px for slides whose metadata has none.")
@click.option("--mpp-csv", type=click.Path(exists=True), default=None,
              help="CSV slide_id,mpp: µm/px per slide, for slides whose metadata has none.")
@click.option("--force-mpp", is_flag=True, help="Use --mpp / --mpp-csv even where the metadata has a µm/px.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: each worker picks fp16 on GPUs with tensor cores, bf16 on CPUs with native bf16, else fp32.")
@click.option("--dihedral-mean", is_flag=True, help="Encode each patch as the mean code of its 8 rotations/flips.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where workers decode and encode: auto = the worker's GPU when it has one.")
@click.option("--block", type=int, default=256, show_default=True,
              help="Cells per block side: one task and one shard file each.")
@click.option("--stride", type=int, default=None,
              help="Px between patches at the encoder's µm/px (default: the encoder's; 64 with 128 px patches: "
                   "overlapping patches, 4x the cells).")
@click.option("--min-tissue", type=float, default=0.1, show_default=True,
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
    from nic_models.registry import get_spec
    from nic_pipeline.compress.api import compress as run_compress
    from nic_pipeline.compress.jobs import plan_jobs
    from nic_pipeline.runtime.cluster import connect

    jobs = plan_jobs(paths, mpp=mpp, mpp_csv=mpp_csv, force_mpp=force_mpp)
    if not jobs:
        raise click.UsageError("no slides found under the given paths")
    spec = get_spec(encoder)
    click.echo(f"encoder: {spec.name} ({(spec.licence or 'your own weights').split(';')[0]})")
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
@click.argument("out_dir", type=click.Path(path_type=Path), default="demo")
@click.option("--slides", "n_slides", type=int, default=16, show_default=True, help="Slides in the synthetic cohort.")
@click.option("--size", type=int, default=4096, show_default=True, help="Side of each slide in px (0.5 µm/px).")
@click.option("--lesion-fraction", type=float, default=0.2, show_default=True,
              help="Lesion share of the tissue on positive slides.")
@click.option("--model", default="abmil", show_default=True, help="A registered slide model (see `nic train --help`).")
@click.option("--folds", type=int, default=4, show_default=True)
@click.option("--workers", type=int, default=None, help="Workers of the embedded cluster.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out_dir, n_slides, size, lesion_fraction, model, folds, workers, seed):
    """Synthesize a cohort, compress it, cross-validate a classifier and draw heatmaps."""
    from nic_pipeline.demo import DemoSpec, run_demo

    run_demo(out_dir, DemoSpec(n_slides, size, lesion_fraction, seed, model, folds, workers))


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
    from nic_pipeline.compress.store import describe_store

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


@main.command("train-encoder")
@click.argument("config", type=EXISTING_PATH)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for <name>.safetensors, <name>.heads.safetensors and the card <name>.json.")
@click.option("--data-root", type=click.Path(exists=True, path_type=Path), default=None,
              help="Where the config's relative data paths point (default: the config's data_root).")
@click.option("--exclude-task", multiple=True, help="Leave a task out (leave-one-task-out runs); repeatable.")
@click.option("--name", default=None, help="Override the model name in the config.")
@click.option("--init", default=None, help="Override init: 'scratch' or an encoder name/card to fine-tune.")
@click.option("--epochs", type=int, default=None, help="Override training.epochs.")
@click.option("--lr", type=float, default=None, help="Override training.lr.")
@click.option("--seed", type=int, default=None, help="Override the seed.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override any config value by dotted key (YAML value), e.g. augment.hed_sigma=0; repeatable.")
def train_encoder_cmd(config, out_dir, data_root, exclude_task, name, init, epochs, lr, seed, settings):
    """Train the NIC encoder by supervised multitask learning on the tasks of CONFIG (YAML)."""
    from nic_pipeline.encoder.config import dotted_overrides, merge
    from nic_pipeline.encoder.train import train_encoder

    overrides = {k: v for k, v in {"name": name, "init": init, "seed": seed,
                                    "exclude_tasks": list(exclude_task) or None}.items() if v is not None}
    training = {k: v for k, v in {"epochs": epochs, "lr": lr}.items() if v is not None}
    if training:
        overrides["training"] = training
    overrides = merge(dotted_overrides(settings), overrides)
    command = "nic " + " ".join(sys.argv[1:])
    card = train_encoder(config, out_dir, command=command, data_root=data_root, overrides=overrides)
    click.echo(f"wrote {Path(out_dir) / card['weights']} and {card['name']}.json "
               f"(best epoch {card['validation']['best_epoch']}, score {card['validation']['score']:.4f})")


@main.command()
@click.argument("tiles", type=EXISTING_PATH)
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path), help="Output .npz.")
@click.option("--encoder", default="nic", show_default=True, help="Registry name, alias or model card / checkpoint path.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None, help="Local weights file.")
@click.option("--random-init", is_flag=True, help="Seeded random weights (baseline).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mpp", type=float, default=None, help="µm/px of the tiles (default: the encoder's).")
@click.option("--crops", type=int, default=1, show_default=True,
              help="Average the codes of CROPS x CROPS patches spread over each tile (1: centre patch).")
@click.option("--path-column", default="path", show_default=True, help="Path column when TILES is a CSV.")
@click.option("--batch-size", type=int, default=64, show_default=True)
def embed(tiles, out_file, encoder, weights, random_init, seed, mpp, crops, path_column, batch_size):
    """Encode tiles (a folder, recursive, or a CSV with a path column) into FILE.npz (features, paths)."""
    import torch

    from nic_models.registry import create_encoder

    from nic_pipeline.encoder.tiles import embed_tiles, read_tile_list, write_features

    root, paths = read_tile_list(tiles, path_column)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    enc = create_encoder(encoder, weights=weights, random_init=random_init, seed=seed, device=device)
    features = embed_tiles(root, paths, enc, mpp=mpp, crops=crops, batch_size=batch_size)
    write_features(out_file, features, paths, encoder=enc.spec.name, encoder_sha256=enc.weights_sha256,
                   mpp=mpp if mpp else enc.spec.mpp, crops=crops)
    click.echo(f"wrote {features.shape[0]} x {features.shape[1]} features to {out_file}")


@main.command()
@click.argument("features", type=EXISTING_PATH)
@click.option("--labels", required=True, type=EXISTING_PATH, help="CSV with path and label columns.")
@click.option("--label-column", default="label", show_default=True)
@click.option("--group-column", default="group", show_default=True,
              help="Group column for group-aware CV (missing column: every tile its own group).")
@click.option("--kind", type=click.Choice(["auto", "classification", "regression"]), default="auto", show_default=True)
@click.option("--folds", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "out_json", type=click.Path(path_type=Path), default=None, help="Also write the result here.")
@click.option("--split-column", default=None,
              help="Fit on the --train-split rows and score the --test-split rows of this column (no CV).")
@click.option("--train-split", default="train", show_default=True)
@click.option("--test-split", default="valid", show_default=True)
def probe(features, labels, label_column, group_column, kind, folds, seed, out_json, split_column,
          train_split, test_split):
    """Linear probe of FEATURES.npz against --labels: group-aware CV, or a held-out split."""
    from nic_pipeline.encoder.probe import format_table, run_probe

    result = run_probe(features, labels, label_column=label_column, group_column=group_column or None,
                       kind=kind, n_splits=folds, seed=seed, out_json=out_json, split_column=split_column,
                       train_split=train_split, test_split=test_split)
    click.echo(format_table({Path(features).name: result}))


# --------------------------------------------------------------------------- slide-level models


def _parse_params(pairs) -> dict:
    """KEY=VALUE pairs -> dict; values parsed as JSON where they can be (numbers, true/false)."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise NicError(f"--param {pair!r}: expected KEY=VALUE, e.g. steps=500")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


@main.command("train")
@click.argument("store", type=EXISTING_PATH)
@click.option("--labels", required=True, type=EXISTING_PATH,
              help="CSV slide_id,label[,group] (survival: slide_id,time,event[,group]).")
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory to write.")
@click.option("--model", default="nic-cnn", show_default=True,
              help="A registered slide model: nic-cnn, abmil, mean, max, topk, dsmil, clam-sb, transmil, local-max "
                   "(docs/classify.md).")
@click.option("--task", type=click.Choice(["binary", "multiclass", "regression", "survival"]), default="binary",
              show_default=True)
@click.option("--folds", type=int, default=5, show_default=True, help="Cross-validation folds (<2: final model only).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--param", "params", multiple=True, help="Override a hyper-parameter, KEY=VALUE (e.g. steps=500); repeatable.")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler.")
@click.option("--scheduler-file", type=click.Path(path_type=Path), default=None, help="Dask scheduler file.")
@click.option("--workers", type=int, default=None, help="Workers of the local cluster (no scheduler named).")
@cluster_options
def train_cmd(store, labels, run_dir, model, task, folds, seed, params, scheduler, scheduler_file, workers, **cluster):
    """Cross-validate a slide-level model on compressed STORE, then train the final model."""
    from nic_pipeline.classify.api import train
    from nic_pipeline.classify import metrics_summary
    from nic_pipeline.runtime.cluster import connect

    scheduler_file = str(scheduler_file) if scheduler_file else None
    with connect(scheduler, scheduler_file, workers, **_connect_options(**cluster)) as client:
        click.echo(f"dashboard: {client.dashboard_link}")
        metrics = train(store, labels, run_dir, client, model=model, task=task, folds=folds, seed=seed,
                        params=_parse_params(params),
                        wait_workers=1 if (scheduler or scheduler_file or cluster["batch_system"]) else 0)
    click.echo(metrics_summary(metrics))
    click.echo(f"wrote {run_dir}/metrics.json, oof_predictions.csv and the final model")


@main.command("predict")
@click.argument("store", type=EXISTING_PATH)
@click.option("--model", "run_dir", required=True, type=EXISTING_PATH, help="Run directory from `nic train`.")
@click.option("--out", "out_csv", required=True, type=click.Path(path_type=Path), help="Predictions CSV.")
def predict_cmd(store, run_dir, out_csv):
    """Score the complete slides of STORE with the final model of a run."""
    from nic_pipeline.classify import predict_cohort

    frame = predict_cohort(store, run_dir, out_csv)
    click.echo(f"scored {len(frame)} slides -> {out_csv}")


@main.command("heatmap")
@click.argument("store", type=EXISTING_PATH)
@click.option("--model", "run_dir", required=True, type=EXISTING_PATH, help="Run directory from `nic train`.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--slides", "slides_dir", type=EXISTING_PATH, default=None,
              help="Directory of the slide files (thumbnails; <slide_id>_lesion.png masks for heatmap AUC).")
@click.option("--masks", "masks_dir", type=EXISTING_PATH, default=None,
              help="Directory of <slide_id>_lesion.png masks (default: --slides).")
def heatmap_cmd(store, run_dir, out_dir, slides_dir, masks_dir):
    """Explanation heatmap PNG per slide (Grad-CAM / attention / linear contribution) beside PCA-RGB."""
    from nic_pipeline.classify.explain import explain_cohort

    frame = explain_cohort(store, run_dir, out_dir, slides_dir=slides_dir, masks_dir=masks_dir)
    line = f"wrote {len(frame)} heatmaps to {out_dir}"
    if "lesion_auc" in frame.columns and frame["lesion_auc"].notna().any():
        line += f"; heatmap AUC vs lesion: median {frame['lesion_auc'].median():.3f}"
    click.echo(line)
