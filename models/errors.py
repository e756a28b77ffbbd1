"""The error base class shared by ``models`` and ``pipeline``.

It lives here, at the bottom of the import graph, so that ``models`` never imports
``pipeline``: ``nic_pipeline.errors`` builds on it.
"""

from __future__ import annotations


class NicError(Exception):
    """A failure the user can fix: bad input, bad option, incompatible store.

    The CLI prints it as one line (no traceback) and exits non-zero; anything else is a bug.
    """
