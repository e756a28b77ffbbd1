"""`python -m nic_pipeline` is the `nic` command."""

from nic_pipeline.cli import run

run()
