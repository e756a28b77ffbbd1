"""Click types for the numeric options of every `nic` command: a bad value stops the command at
once with one line naming the option (`error: Invalid value for '--mpp': ...`, exit 2), before
any cluster starts (issue 21: `--mpp 0`, `nan` and `inf` ended in a Dask traceback dump)."""

from __future__ import annotations

import math

import click


class FiniteFloat(click.FloatRange):
    """A float within an optional range that is neither NaN nor infinite (click's FloatRange lets
    both through: NaN compares false with every bound, and an open range has no bound to pass)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


POSITIVE = FiniteFloat(min=0, min_open=True)
"""µm/px, learning rates: a finite number above 0."""
NON_NEGATIVE = FiniteFloat(min=0)
"""Seconds to wait."""
FRACTION = FiniteFloat(min=0, max=1)
"""A share of something: 0 to 1."""
COUNT = click.IntRange(min=1)
"""Workers, slides, epochs, px, cells: at least 1."""
SEED = click.IntRange(min=0)
"""Random seeds (NumPy takes none below 0)."""
