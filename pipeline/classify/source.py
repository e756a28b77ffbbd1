"""Store access for slide-level learning: the complete slides of a store, and one slide (or one
crop) at a time through :class:`SlideSource`, with a bounded cache.

Every read goes through :meth:`SlideSource._read`, so a store that cannot be read (a truncated
or corrupt chunk, a missing array) is one NicError naming the store and the slide.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from nic_pipeline.compress.catalog import list_slides
from nic_pipeline.compress.index import is_current, read_index
from nic_pipeline.compress.store import block_name, check_slide, open_cohort, slide_damage
from nic_pipeline.errors import NicError


def list_store_slides(store) -> list[str]:
    """Slide ids of the complete slides in a store."""
    try:
        return list_slides(store, complete_only=True)
    except NicError:
        raise
    except Exception as err:  # noqa: BLE001 - zarr raises several types for a missing store
        raise NicError(f"{store}: not a readable Zarr store ({err})") from err


class SlideSource:
    """Reads slide tensors from a store one slide (or one crop) at a time.

    A slide's shape and attributes come from the store's index while its line is current (one
    read for the whole cohort, then a ``stat`` per file of the slide, where opening each slide's
    group and checking it would cost a few reads per slide); arrays are read with Zarr directly.
    Whole slides are kept in a least-recently-used cache bounded by
    ``cache_mb`` (float16 as stored), so small cohorts are read once while cohorts larger than
    memory stream from Zarr. A slide larger than the cache is never loaded whole for crops:
    crops are read directly.
    """

    def __init__(self, store, cache_mb: float = 1024):
        self.store = str(store)
        self.budget = int(cache_mb * 2**20)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._tissue: dict[str, np.ndarray] = {}
        self._meta: dict[str, dict] = {}
        self._root = None
        self._index: dict[str, dict] | None = None
        self._current: dict[str, bool] = {}

    def group(self, slide_id: str):
        """The slide's Zarr group, read from its own metadata."""
        if self._root is None:
            self._root = open_cohort(self.store)
        try:
            return self._root[slide_id]
        except KeyError:
            raise NicError(f"{self.store}: no slide {slide_id!r} in this store") from None

    def _read(self, slide_id: str, name: str, window=None) -> np.ndarray:
        """Array ``name`` of a slide (optionally a window of it) as numpy; NicError naming the
        store and the slide when it cannot be read."""
        try:
            array = self.group(slide_id)[name]
            return array[...] if window is None else array[window]
        except NicError:
            raise
        except Exception as err:  # noqa: BLE001 - zarr/codecs raise many types for damaged chunks
            raise NicError(f"{self.store}: cannot read {name!r} of slide {slide_id!r} "
                           f"({type(err).__name__}: {err}); the store is damaged: recompress this slide") from err

    def _entry(self, slide_id: str) -> dict | None:
        """The slide's index line while its files are unchanged (checked once), else None."""
        if self._index is None:
            self._index = read_index(self.store)
        entry = self._index.get(slide_id)
        if entry is not None and slide_id not in self._current:
            self._current[slide_id] = is_current(self.store, entry)
        return entry if entry is not None and self._current[slide_id] else None

    def shape(self, slide_id: str) -> tuple[int, int, int]:
        """(C, ny, nx) of the slide's code grid."""
        entry = self._entry(slide_id)
        return tuple(entry["shape"]) if entry else self.meta(slide_id)["shape"]

    def attrs(self, slide_id: str) -> dict:
        """The slide's attributes (encoder, µm/px, grid, source; per-block records only from
        :meth:`meta`)."""
        entry = self._entry(slide_id)
        return entry["attrs"] if entry else self.meta(slide_id)["attrs"]

    def meta(self, slide_id: str) -> dict:
        """Shape (C, ny, nx), attrs and cell-centre coordinates of a slide; a NicError when a shard
        its compression recorded is missing or of another size (Zarr would read it as zeros)."""
        if slide_id not in self._meta:
            group = self.group(slide_id)
            damage = slide_damage(self.store, slide_id)  # its own files, not the consolidated copy
            if damage:
                raise NicError(f"{self.store}: slide {slide_id!r} is damaged ({damage}); rerun nic compress on it to mend it")
            if "blocks" in group.attrs:
                damaged = check_slide(group)
                if damaged:
                    block, why = damaged[0]
                    raise NicError(f"{self.store}: slide {slide_id!r} is damaged (block {block_name(block)} {why}); "
                                   "rerun nic compress on it to mend it")
            self._meta[slide_id] = dict(
                shape=tuple(int(s) for s in group["features"].shape), attrs=dict(group.attrs),
                y=self._read(slide_id, "y").astype(float), x=self._read(slide_id, "x").astype(float))
        return self._meta[slide_id]

    def tissue(self, slide_id: str) -> np.ndarray:
        """Tissue fraction per cell, float32 (ny, nx) (small; always kept)."""
        if slide_id not in self._tissue:
            self._tissue[slide_id] = self._read(slide_id, "tissue").astype(np.float32)
        return self._tissue[slide_id]

    def features(self, slide_id: str) -> np.ndarray:
        """The whole code grid, float16 (C, ny, nx); cached when it fits the budget."""
        if slide_id in self._cache:
            self._cache.move_to_end(slide_id)
            return self._cache[slide_id]
        feats = self._read(slide_id, "features").astype(np.float16, copy=False)
        if feats.nbytes <= self.budget:
            while self._cache and self._cached_bytes + feats.nbytes > self.budget:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
            self._cache[slide_id] = feats
            self._cached_bytes += feats.nbytes
        return feats

    def clear(self) -> None:
        """Drop the cached code grids (callers that visit each slide once)."""
        self._cache.clear()
        self._cached_bytes = 0

    def crop(self, slide_id: str, y0: int, x0: int, size: int):
        """Codes (C, size, size) float16 and tissue (size, size) of a window, zero outside the grid."""
        c, ny, nx = self.meta(slide_id)["shape"]
        out = np.zeros((c, size, size), np.float16)
        tis = np.zeros((size, size), np.float32)
        ys, ye, xs, xe = max(y0, 0), min(y0 + size, ny), max(x0, 0), min(x0 + size, nx)
        if ye > ys and xe > xs:
            if slide_id in self._cache or c * ny * nx * 2 <= self.budget:
                window = self.features(slide_id)[:, ys:ye, xs:xe]
            else:
                window = self._read(slide_id, "features", (slice(None), slice(ys, ye), slice(xs, xe)))
            out[:, ys - y0:ye - y0, xs - x0:xe - x0] = window
            tis[ys - y0:ye - y0, xs - x0:xe - x0] = self.tissue(slide_id)[ys:ye, xs:xe]
        return out, tis

    def valid_cells(self, slide_id: str) -> np.ndarray:
        """Bool (ny, nx): cells that hold tissue codes (tissue > 0 and a non-zero code)."""
        return (self.tissue(slide_id) > 0) & np.any(self.features(slide_id) != 0, axis=0)

    def bag(self, slide_id: str):
        """Codes of the tissue cells (n, C) float32 and their (row, col) indices (n, 2)."""
        feats = self.features(slide_id)
        valid = self.valid_cells(slide_id)
        rows, cols = np.nonzero(valid)
        return feats[:, rows, cols].T.astype(np.float32), np.stack([rows, cols], 1)
