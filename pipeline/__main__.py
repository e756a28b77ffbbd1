"""`python -m pipeline` is the `nic` command."""

from pipeline.cli import run

run()
