"""What a store holds: its slide ids and one row per slide (``nic inspect``).

Listed from the store's folder (one listing); each slide is described from its index line
(:mod:`nic_pipeline.compress.index`) while that is current, and from its own metadata otherwise:
a slide that a killed run finished without indexing, one being made, one damaged since.
"""

from __future__ import annotations

import os
import warnings

import zarr
from zarr.core.sync import sync

from nic_pipeline.compress.index import is_current, read_index, slide_entry
from nic_pipeline.compress.store import (
    COMPLETE,
    FAILED,
    IN_PROGRESS,
    MEND,
    child_path,
    open_cohort,
    open_slide_group,
    slide_damage,
)
from nic_pipeline.errors import NicError


def index_entry(store: str, slide_id: str) -> dict:
    """The index line of a complete slide, read from its own group (on the worker that finished it)."""
    group = open_slide_group(store, slide_id, mode="r")
    return slide_entry(store, slide_id, dict(group.attrs), group["features"].shape, _tissue_cells(group))


def _children(root: zarr.Group) -> list[str]:
    """Every entry of the store's folder but its own zarr.json, read from the files."""
    return sorted(name for name in sync(_list(root.store.list_dir(root.path))) if name != "zarr.json")


async def _list(iterator) -> list[str]:
    return [name.rstrip("/") async for name in iterator]


def lost_groups(root: zarr.Group, known: set[str] = frozenset()) -> list[str]:
    """Folders of the store that look like slides but lost their zarr.json (a damaged store);
    ``known``: names already read as slides, not checked again."""
    return sorted(name for name in _children(root) if "." not in name and not name.startswith("_")
                  and name not in known and not sync(root.store.exists(f"{child_path(root, name)}/zarr.json")))


def _status(root: zarr.Group, name: str) -> str | None:
    """A slide's status read from its own zarr.json; None for an entry that is no slide group;
    NicError naming a slide whose metadata is damaged."""
    path = child_path(root, name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        try:
            group = open_slide_group(root.store, path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError,
                zarr.errors.NodeTypeValidationError):
            return None
        except Exception:  # noqa: BLE001 - a slide's zarr.json that does not parse
            damage = slide_damage(root.store, path)
            raise NicError(f"{root.store.root}: slide {name!r} is damaged ({damage}); "
                           "rerun nic compress on it to mend it") from None
    return group.attrs.get("status", IN_PROGRESS)


def list_slides(store: str | os.PathLike, complete_only: bool = True) -> list[str]:
    """Slide ids in a store, sorted; only the complete ones unless told otherwise."""
    root = open_cohort(store)
    entries = read_index(store)
    found = []
    for name in _children(root):
        entry = entries.get(name)
        status = COMPLETE if entry and is_current(store, entry) else _status(root, name)
        if status is not None and (not complete_only or status == COMPLETE):
            found.append(name)
    return found


def describe_store(store: str | os.PathLike) -> list[dict]:
    """One row per slide, failed ones included: id, status, grid, encoded cells, encoder, source."""
    try:
        root = zarr.open_group(str(store), mode="r", zarr_format=3, use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as err:
        raise NicError(f"{store}: not a compressed-slide store ({err})") from err
    failed = dict(root.attrs.get("failed", {}))
    entries = read_index(store)
    rows = []
    for slide_id in _children(root):
        entry = entries.get(slide_id)
        if entry and is_current(store, entry):
            rows.append(_row(slide_id, COMPLETE, entry, failed.pop(slide_id, None)))
            continue
        row = _row_from_group(root, slide_id, failed)
        if row is not None:
            rows.append(row)
    lost = lost_groups(root, known={row["slide_id"] for row in rows})
    failed.update({slide_id: f"its zarr.json is lost: {MEND}" for slide_id in lost if slide_id not in failed})
    rows += [_failed_row(slide_id, reason) for slide_id, reason in sorted(failed.items())]
    return rows


def _row_from_group(root: zarr.Group, slide_id: str, failed: dict) -> dict | None:
    """A slide's row read from its own files (popping its reason from ``failed``), or None for an
    entry of the store that is no slide."""
    path = child_path(root, slide_id)
    if not sync(root.store.exists(f"{path}/zarr.json")):
        return None  # a lost zarr.json: listed by lost_groups
    damage = slide_damage(root.store, path)
    if damage:
        failed.pop(slide_id, None)
        return _failed_row(slide_id, f"damaged: {damage}; {MEND}")
    try:
        group = open_slide_group(root.store, path, mode="r")
    except (zarr.errors.ContainsArrayError, zarr.errors.NodeTypeValidationError, ValueError):
        return None  # an array, not a slide
    attrs = dict(group.attrs)
    status = attrs.get("status", IN_PROGRESS)
    if status != COMPLETE and slide_id in failed:
        status = FAILED
    tissue_cells = _tissue_cells(group) if "status" in attrs else 0
    return _row(slide_id, status, slide_entry(root.store.root, path, attrs, (), tissue_cells, with_files=False),
                failed.pop(slide_id, None))


def _row(slide_id: str, status: str, entry: dict, error: str | None) -> dict:
    attrs = entry["attrs"]
    return {
        "slide_id": slide_id, "status": status, "grid_shape": list(attrs.get("grid_shape", [])),
        "tissue_cells": entry["tissue_cells"], "encoder": attrs.get("encoder"),
        "encoder_sha256": attrs.get("encoder_sha256"), "mpp": attrs.get("mpp"), "patch_size": attrs.get("patch_size"),
        "stride": attrs.get("stride"), "slide_mpp": attrs.get("slide_mpp"), "mpp_source": attrs.get("mpp_source"),
        "precisions": entry["precisions"], "decoders": entry["decoders"], "source_path": attrs.get("source_path"),
        "error": error,
    }


def _failed_row(slide_id: str, reason: str) -> dict:
    return {"slide_id": slide_id, "status": FAILED, "grid_shape": [], "tissue_cells": 0, "encoder": None,
            "encoder_sha256": None, "mpp": None, "patch_size": None, "stride": None, "slide_mpp": None,
            "mpp_source": None, "precisions": [], "decoders": [], "source_path": None, "error": reason}


def _tissue_cells(group: zarr.Group) -> int:
    return int((group["tissue"][...] >= group.attrs.get("min_tissue", 0.0)).sum())
