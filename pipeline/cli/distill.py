"""`nic distill-encoder`: a fast NIC CNN student trained on any registered encoder's codes."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nic_pipeline.cli.group import EXISTING_PATH, main


@main.command("distill-encoder")
@click.argument("config", type=EXISTING_PATH)
@click.option("--teacher", required=True,
              help="Any registered encoder, alias or card path (nic-mtl-v3, a foundation preset, ...).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for <name>.safetensors and the card <name>.json.")
@click.option("--student", default=None, help="Start point and architecture of the student (default: nic-mtl-v1).")
@click.option("--name", default=None, help="Name of the student (default: <teacher>-fast).")
@click.option("--data-root", type=click.Path(exists=True, path_type=Path), default=None,
              help="Where the config's relative data paths point (default: the config's data_root).")
@click.option("--exclude-task", multiple=True,
              help="Leave a task's tiles out (e.g. monuseg_nuclei for a licence-clean student); repeatable.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override distill.epochs.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override any config value by dotted key, e.g. distill.grid=3; repeatable.")
def distill_encoder_cmd(config, teacher, out_dir, student, name, data_root, exclude_task, epochs, settings):
    """Distil TEACHER into a NIC CNN on the tiles of CONFIG (a training config; labels unused)."""
    from nic_pipeline.encoder.config import dotted_overrides, merge
    from nic_pipeline.encoder.distill import distill_encoder

    distill = {k: v for k, v in {"student": student, "epochs": epochs}.items() if v is not None}
    overrides = merge({"distill": distill, **({"exclude_tasks": list(exclude_task)} if exclude_task else {})},
                      dotted_overrides(settings))
    card = distill_encoder(config, teacher, out_dir, name=name, data_root=data_root, overrides=overrides,
                           command="nic " + " ".join(sys.argv[1:]))
    held = card["distillation"]["held_out"]
    click.echo(f"wrote {out_dir}/{card['name']}.safetensors: held-out agreement with {teacher} "
               f"R² {held['r2']:.3f}, cosine {held.get('cosine', float('nan')):.3f} (best epoch "
               f"{card['distillation']['best_epoch']})")
