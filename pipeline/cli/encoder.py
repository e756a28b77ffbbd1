"""Patch encoders: `nic encoders`, `nic train-encoder`, `nic embed`, `nic probe`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nic_pipeline.cli.group import EXISTING_PATH, main
from nic_pipeline.cli.types import COUNT, POSITIVE, SEED


@main.command()
def encoders():
    """List the registry's encoders: patch, µm/px, code size, parameters, licence, commercial use,
    gated, and whether the weights are on this machine."""
    from nic_models.licences import licence_line, licence_terms
    from nic_models.registry import (
        DEFAULT_ALIAS,
        DEFAULT_ENCODER,
        get_spec,
        list_encoders,
        weights_found,
    )

    def yes_no(value) -> str:
        return "-" if value is None else ("yes" if value else "no")

    click.echo(f"{'name':<28} {'patch':>5} {'µm/px':>6} {'code':>5} {'params':>7} {'comm.':>5} {'gated':>5} "
               f"{'found':>5}  licence")
    for name in list_encoders(include_aliases=False):
        spec = get_spec(name)
        marker = f"  (= {DEFAULT_ALIAS})" if name == DEFAULT_ENCODER else ""
        params = "-" if not spec.params else f"{spec.params / 1e6:.0f}M"
        found = "n/a" if spec.architecture == "unavailable" else yes_no(weights_found(name) is not None)
        click.echo(f"{name:<28} {spec.patch_size:>5} {spec.mpp:>6g} {spec.code_dim:>5} {params:>7} "
                   f"{yes_no(licence_terms(spec.licence, spec.commercial)['commercial']):>5} {yes_no(spec.gated):>5} "
                   f"{found:>5}  {licence_line(spec.licence, spec.commercial)}{marker}")


@main.command("train-encoder")
@click.argument("config", type=EXISTING_PATH)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for <name>.safetensors, <name>.heads.safetensors and the card <name>.json.")
@click.option("--data-root", type=click.Path(exists=True, path_type=Path), default=None,
              help="Where the config's relative data paths point (default: the config's data_root).")
@click.option("--exclude-task", multiple=True, help="Leave a task out (leave-one-task-out runs); repeatable.")
@click.option("--name", default=None, help="Override the model name in the config.")
@click.option("--init", default=None, help="Override init: 'scratch' or an encoder name/card to fine-tune.")
@click.option("--epochs", type=COUNT, default=None, help="Override training.epochs.")
@click.option("--lr", type=POSITIVE, default=None, help="Override training.lr.")
@click.option("--seed", type=SEED, default=None, help="Override the seed.")
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
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--mpp", type=POSITIVE, default=None, help="µm/px of the tiles (default: the encoder's).")
@click.option("--crops", type=COUNT, default=1, show_default=True,
              help="Average the codes of CROPS x CROPS patches spread over each tile (1: centre patch).")
@click.option("--path-column", default="path", show_default=True, help="Path column when TILES is a CSV.")
@click.option("--batch-size", type=COUNT, default=64, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="As for `nic compress`: auto = fp16 on GPUs with tensor cores, bf16 on CPUs with native bf16.")
def embed(tiles, out_file, encoder, weights, random_init, seed, mpp, crops, path_column, batch_size, precision):
    """Encode tiles (a folder, recursive, or a CSV with a path column) into FILE.npz (features, paths)."""
    import torch

    from nic_models.registry import create_encoder
    from nic_pipeline.encoder.tiles import embed_tiles, read_tile_list, write_features

    root, paths = read_tile_list(tiles, path_column)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    enc = create_encoder(encoder, weights=weights, random_init=random_init, seed=seed, device=device)
    features = embed_tiles(root, paths, enc, mpp=mpp, crops=crops, batch_size=batch_size, precision=precision)
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
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
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
