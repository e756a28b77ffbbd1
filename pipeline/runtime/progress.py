"""Progress for people and for log files: one helper that every loop of the pipeline reports through.

In a terminal it is a tqdm bar. Outside one (SLURM, nohup, a pipe: the stream is not a TTY) a
bar's carriage returns and escapes would fill the log with hundreds of redrawn lines, so it writes
plain lines instead, such as::

    patches: 12,288/40,960 patch (30 %) 412 patch/s, 30 s elapsed

one each time another tenth of the total is done, or ``interval`` seconds have passed (default 30,
``NIC_PROGRESS_INTERVAL``), and one at the end. A transient bar (``leave=False``: an epoch's
steps, one slide's tiles) writes only on the interval, never at every tenth, so nested loops do
not multiply the lines.

A total that is still growing (``growing=True``: patches, known only once each slide's tissue is
found) is never shown as a percentage, which would go backwards as the total grows: the line says
``12,288 of 40,960 found so far`` (and the last line, once the total is known, the share). ``NIC_PROGRESS=plain|bar|off`` overrides the choice.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import IO

from tqdm.auto import tqdm

INTERVAL_S = 30.0  # plain mode: at most this long between two lines of a running loop
STEPS = 10  # plain mode: a line each time another 1/STEPS of the total is done


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, leave: bool = True, growing: bool = False,
                 file: IO | None = None, interval: float | None = None, **tqdm_kwargs):
    """A progress reporter with tqdm's interface (``update``, ``n``, ``total``, ``set_postfix``,
    ``close``, iteration, ``with``): a tqdm bar when ``file`` (default stderr) is a terminal, else
    :class:`PlainProgress`."""
    file = sys.stderr if file is None else file
    mode = _mode(file)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable or mode == "off":
        return PlainProgress(iterable, total=total, desc=desc, unit=unit, disable=True)
    if mode == "bar":
        if growing:  # no percentage of a total that is not known yet
            tqdm_kwargs.setdefault("bar_format", "{desc}: {n_fmt}/{total_fmt} {unit} found so far "
                                                 "[{elapsed}, {rate_fmt}{postfix}]")
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=file, **tqdm_kwargs)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, leave=leave, growing=growing, file=file,
                         interval=interval)


def _mode(file) -> str:
    chosen = os.environ.get("NIC_PROGRESS", "").strip().lower()
    if chosen in ("plain", "bar", "off"):
        return chosen
    try:
        return "bar" if file.isatty() else "plain"
    except (AttributeError, ValueError):  # closed or not a real stream
        return "plain"


class PlainProgress:
    """Plain, periodic progress lines for logs (see the module's docstring)."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", leave=True, growing=False, file=None,
                 interval=None, disable=False):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.leave, self.growing, self.disable = leave, growing, disable
        self.file = sys.stderr if file is None else file
        env = os.environ.get("NIC_PROGRESS_INTERVAL")
        self.interval = float(interval if interval is not None else env if env else INTERVAL_S)
        self.n, self.postfix, self.closed = 0, "", False
        self.start = self.last_time = time.monotonic()
        self.last_step = 0

    # tqdm's interface -------------------------------------------------------------------------
    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self):
        return int(self.total or 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = time.monotonic()
        step = self._step()
        if (self.leave and step > self.last_step) or now - self.last_time >= self.interval:
            self._write(now)
        self.last_step = max(self.last_step, step)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc=None, refresh=True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw in a log."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.leave:
            self._write(time.monotonic(), final=True)

    # lines --------------------------------------------------------------------------------------
    def _step(self) -> int:
        if self.growing or not self.total:
            return 0
        return int(STEPS * min(self.n / self.total, 1.0))

    def line(self, now: float | None = None, final: bool = False) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.start
        count = _number(self.n)
        if self.total and self.growing and not final:
            count += f" of {_number(self.total)} found so far"
        elif self.total:
            count += f"/{_number(self.total)} {self.unit} ({100 * self.n / self.total:.0f} %)"
        else:
            count += f" {self.unit}"
        rate = f", {self.n / elapsed:.3g} {self.unit}/s" if elapsed > 0 and self.n else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        return (f"{self.desc + ': ' if self.desc else ''}{count}{rate}, {_duration(elapsed)} "
                f"{'in all' if final else 'elapsed'}{postfix}")

    def _write(self, now: float, final: bool = False) -> None:
        self.last_time = now
        print(self.line(now, final), file=self.file, flush=True)


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
