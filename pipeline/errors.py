"""Expected, user-facing failures.

The CLI prints a :class:`NicError` as one line (no traceback) and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

from nic_models.errors import NicError

__all__ = ["NicError", "SlideError"]


class SlideError(NicError):
    """A slide that cannot be used, with the slide named and the reason given."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
