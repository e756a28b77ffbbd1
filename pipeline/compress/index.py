"""The store's slide index: what ``nic inspect`` and ``nic train`` need of every slide, appended
as slides finish, so that opening a 10,000-slide cohort is one folder listing and a few reads.

Layout::

    STORE.zarr/_index/<UTC time>-<run>.jsonl    one JSON line per slide a run finished or
                                                found finished; later lines win

Each line holds the slide's attributes (less the per-block records), its code-grid shape, its
tissue cell count and the size and modification time of every file of its folder. The index is a
cache, never the truth: a line is used only while every file it lists still has that size and
time (one ``stat`` each), so a slide changed, damaged, recompressed or removed since is read
from its own metadata instead. A run killed mid-way leaves its file with the lines of the slides
it finished (a partial last line is skipped); the next run adds the rest. Nothing is rewritten
whole: when more than :data:`MAX_PARTS` files accumulate, a run merges the older ones into one.

Zarr ignores the folder (its name starts with ``_``, and it holds no ``zarr.json``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

INDEX_DIR = "_index"
MAX_PARTS = 16
"""Index files kept before a run merges them (each run adds one)."""
_OMITTED_ATTRS = ("blocks",)
"""Attributes left out of a line: per-block records, the bulk of a large slide's metadata."""


def slide_entry(store: str | os.PathLike, slide_id: str, attrs: dict, shape, tissue_cells: int,
                with_files: bool = True) -> dict:
    """The index line of a finished slide, made where it was finished (its files as they are now;
    ``with_files=False``: without them, a description that is never written)."""
    folder = Path(store) / slide_id
    files = {}
    for parent, _, names in os.walk(folder) if with_files else ():
        for name in names:
            path = Path(parent) / name
            stat = path.stat()
            files[path.relative_to(folder).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    blocks = attrs.get("blocks", {}).values()
    return {
        "slide_id": slide_id, "shape": [int(n) for n in shape], "tissue_cells": int(tissue_cells),
        "precisions": sorted({b.get("precision") for b in blocks} - {None}),
        "decoders": sorted({b.get("decoder") for b in blocks} - {None}),
        "attrs": {k: v for k, v in attrs.items() if k not in _OMITTED_ATTRS}, "files": files,
    }


def is_current(store: str | os.PathLike, entry: dict) -> bool:
    """True when every file the line lists still has its recorded size and modification time."""
    folder = os.path.join(store, entry["slide_id"])  # strings: 10,000 slides x 9 files
    for name, (size, mtime_ns) in entry["files"].items():
        try:
            stat = os.stat(f"{folder}/{name}")
        except OSError:
            return False
        if stat.st_size != size or stat.st_mtime_ns != mtime_ns:
            return False
    return True


def _parts(store: str | os.PathLike) -> list[Path]:
    """The index files, oldest first (their names start with the UTC time they were begun)."""
    folder = Path(store) / INDEX_DIR
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def _read_part(path: Path, entries: dict[str, dict]) -> None:
    try:
        text = path.read_text()
    except OSError:  # removed by a merge meanwhile: its lines are in the merged file
        return
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run
            continue
        if isinstance(entry, dict) and isinstance(entry.get("slide_id"), str):
            entries[entry["slide_id"]] = entry


def read_index(store: str | os.PathLike) -> dict[str, dict]:
    """Every slide's latest index line (not yet checked against its files: :func:`is_current`)."""
    entries: dict[str, dict] = {}
    for part in _parts(store):
        _read_part(part, entries)
    return entries


def current_entries(store: str | os.PathLike) -> dict[str, dict]:
    """The index lines whose slide files are unchanged since they were written."""
    return {sid: entry for sid, entry in read_index(store).items() if is_current(store, entry)}


class IndexWriter:
    """Appends one run's lines to its own index file (one ``write`` per line, flushed at once)."""

    def __init__(self, store: str | os.PathLike, run: str):
        self.path = Path(store) / INDEX_DIR / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{run}.jsonl"
        self._file = None

    def add(self, entry: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(entry, separators=(",", ":"), default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        merge_parts(self.path.parent.parent)


def merge_parts(store: str | os.PathLike, keep: int = MAX_PARTS) -> None:
    """Merge the index files into one when there are more than ``keep``: the merged lines take the
    newest file's name (written aside, then renamed over it), and the older files are removed.
    A merge cut short leaves older files whose lines the merged file overrides."""
    parts = _parts(store)
    if len(parts) <= keep:
        return
    entries: dict[str, dict] = {}
    for part in parts:
        _read_part(part, entries)
    newest = parts[-1]
    aside = newest.with_suffix(".merging")
    aside.write_text("".join(json.dumps(e, separators=(",", ":"), default=str) + "\n" for e in entries.values()),
                     encoding="utf-8")
    os.replace(aside, newest)
    for part in parts[:-1]:
        part.unlink(missing_ok=True)
