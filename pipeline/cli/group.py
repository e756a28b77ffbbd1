"""The `nic` command group: one-line errors (exit 2), one line on Ctrl-C (exit 130), the process exit."""

from __future__ import annotations

import gc
import sys
from importlib import import_module
from pathlib import Path

import click

from nic_pipeline.errors import NicError
from nic_pipeline.runtime.process import warnings_in_one_line

EXISTING_PATH = click.Path(exists=True, path_type=Path)


def default_slide_model() -> str:
    """``--model``'s default, read from the slide-model registry when a command runs (importing it
    at start-up would import torch and slow every ``nic`` command)."""
    return import_module("nic_models.slide_models.registry").DEFAULT_SLIDE_MODEL


class NicGroup(click.Group):
    """A click group that turns :class:`NicError` into a one-line message and exit code 2."""

    def invoke(self, ctx):
        warnings_in_one_line()
        try:
            return super().invoke(ctx)
        except NicError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except click.UsageError as err:  # a bad option value: one line, not click's usage block
            click.echo(f"error: {err.format_message()}", err=True)
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
