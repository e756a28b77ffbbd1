"""The `nic` command line: one module per stage, assembled here.

Each command parses its options and hands over to one module function; the heavy
imports (torch, dask, cuCIM) happen inside the command, so `nic --help` is instant.
Expected failures (:class:`~nic_pipeline.errors.NicError`) print one line and exit 2; Ctrl-C prints
one line and exits 130.
"""

from nic_pipeline.cli import classify, cluster, compress, demo, distill, encoder, interop, slides, viz  # noqa: F401 - registers them
from nic_pipeline.cli.group import main, run

__all__ = ["main", "run"]
