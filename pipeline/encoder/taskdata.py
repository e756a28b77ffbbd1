"""One training task's data: tiles in memory, group-aware split, fixed validation patches,
target scaling, and task-balanced augmented batches.

Tiles are read from the task's sources (:func:`nic_pipeline.encoder.tiles.read_source`), downsampled
once to the encoder's µm/px, and cut into ``patch_size`` crops on the fly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from nic_pipeline.encoder import tiles as T
from nic_pipeline.io.masks import read_mask
from nic_pipeline.runtime.progress import progress_bar

AUGMENT_KEYS = ("hed_sigma", "brightness", "contrast", "blur_p", "blur_sigma", "macenko_scale", "macenko_shift")


@dataclass
class TaskData:
    """One task's tiles in memory, its split, fixed validation patches and target scaling."""

    name: str
    kind: str  # classification | regression | mask_fraction
    weight: float
    images: list
    mpps: np.ndarray
    masks: list
    targets: np.ndarray
    groups: np.ndarray
    classes: list[str] | None = None
    train_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    val_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    mean: float = 0.0
    std: float = 1.0
    sources: list = field(default_factory=list)
    batch: int | None = None  # patches per step; None: the config's batch_per_task

    @property
    def head_kind(self) -> str:
        """The head this task trains: ``classification``, or ``regression`` for the other kinds."""
        return "classification" if self.kind == "classification" else "regression"


def _min_side(path) -> int:
    """The shorter side of an image file, in px (read from its header)."""
    with Image.open(path) as im:
        return min(im.size)


def source_record(source: dict, table: pd.DataFrame, root: str) -> dict:
    """What the model card says about one data source: path, tile count, content hash, µm/px, licence."""
    src_root = Path(table["root"].iloc[0])
    files = list(table["path"]) + [m for m in table.get("mask", []) if isinstance(m, str)]
    return {
        "path": os.path.relpath(src_root, root),
        "n_tiles": int(len(table)),
        "sha256": T.dataset_sha256([os.path.relpath(f, root) for f in files], root),
        "hash_of": "sha256 over the sorted relative file names + contents (tiles and masks)",
        "mpp": float(source["mpp"]),
        **{k: source[k] for k in ("mpp_note", "licence", "citation") if k in source},
    }


def read_task_table(task_cfg: dict, root: str) -> tuple[pd.DataFrame, list[dict]]:
    """All tiles of a task's sources as one table, and the sources' card records."""
    tables, sources = [], []
    for source in task_cfg["sources"]:
        table = T.read_source(source, root)
        if source.get("min_size"):
            table = table[[_min_side(p) >= source["min_size"] for p in table["path"]]]
        sources.append(source_record(source, table, root))
        tables.append(table)
    return pd.concat(tables, ignore_index=True), sources


def load_tiles(table: pd.DataFrame, kind: str, target_mpp: float, desc: str, progress: bool):
    """``(images, masks, mpps)``: every tile (and mask) read and downsampled to ``target_mpp``."""
    images, masks, mpps = [], [], []
    for row in progress_bar(table.itertuples(), total=len(table), desc=desc, disable=not progress, leave=False):
        image = T.read_rgb(row.path)
        mask = read_mask(row.mask).astype(np.float32) if kind == "mask_fraction" else None
        image, mpp, mask = T.prepare_image(image, row.mpp, target_mpp, mask)
        images.append(image)
        masks.append(mask)
        mpps.append(mpp)
    return images, masks, mpps


def task_targets(table: pd.DataFrame, kind: str) -> tuple[np.ndarray, list[str] | None]:
    """Per-tile targets (class index, value, or NaN for mask fractions) and the sorted class names."""
    if kind == "classification":
        classes = sorted(table["label"].unique())
        return table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(), classes
    if kind == "regression":
        return table["value"].astype(float).to_numpy(), None
    return np.full(len(table), np.nan), None


def build_task(task_cfg: dict, config: dict, progress: bool = False) -> TaskData:
    """Read a task's sources, load the tiles (pre-downsampled to the target µm/px) and split them."""
    target_mpp = float(config["target_mpp"])
    size = int(config["patch_size"])
    kind = task_cfg["type"]
    table, sources = read_task_table(task_cfg, config["data_root"])
    images, masks, mpps = load_tiles(table, kind, target_mpp, f"load {task_cfg['name']}", progress)
    targets, classes = task_targets(table, kind)
    data = TaskData(name=task_cfg["name"], kind=kind, weight=float(task_cfg.get("weight", 1.0)),
                    images=images, mpps=np.asarray(mpps, float), masks=masks, targets=targets,
                    groups=table["group"].to_numpy(), classes=classes, sources=sources,
                    batch=int(task_cfg["batch"]) if task_cfg.get("batch") else None)
    tr = config["training"]
    data.train_idx, data.val_idx = T.group_split(
        data.groups, targets if kind == "classification" else None,
        float(task_cfg.get("val_fraction", tr["val_fraction"])), seed=int(config["seed"]))
    _make_validation(data, size, target_mpp, int(task_cfg.get("val_grid", tr["val_grid"])))
    _fit_scaling(data, size, target_mpp, np.random.default_rng(int(config["seed"]) + 7))
    return data


def _patch_target(data: TaskData, i: int, box) -> float:
    """The target of one patch: the tile's label or value, or the mask fraction inside the box."""
    if data.kind == "mask_fraction":
        return T.box_mean(data.masks[i], box)
    return float(data.targets[i])


def _make_validation(data: TaskData, size: int, target_mpp: float, grid: int) -> None:
    """Fixed validation patches: a ``grid x grid`` set of crops per validation tile, no augmentation."""
    xs, ys = [], []
    for i in data.val_idx:
        side = T.source_side(data.mpps[i], target_mpp, size)
        for box in T.grid_boxes(data.images[i].shape, side, grid):
            xs.append(T.crop_resample(data.images[i], box, size))
            ys.append(_patch_target(data, i, box))
    data.val_x = np.stack(xs) if xs else np.zeros((0, size, size, 3), np.uint8)
    data.val_y = np.asarray(ys)


def _fit_scaling(data: TaskData, size: int, target_mpp: float, rng: np.random.Generator, n: int = 512) -> None:
    """Mean/std of regression targets on the training side (targets are standardised for the loss)."""
    if data.kind == "classification" or not len(data.train_idx):
        return
    if data.kind == "regression":
        values = data.targets[data.train_idx]
    else:
        values = []
        for i in rng.choice(data.train_idx, size=n):
            box = T.random_box(data.images[i].shape, T.source_side(data.mpps[i], target_mpp, size), rng)
            values.append(T.box_mean(data.masks[i], box))
    data.mean, data.std = float(np.mean(values)), float(np.std(values) + 1e-6)


def sample_batch(data: TaskData, n: int, rng: np.random.Generator, size: int, target_mpp: float,
                 augment: dict, balance_classes: bool = True):
    """``n`` augmented training patches of one task and their (standardised) targets."""
    idx = data.train_idx
    if data.kind == "classification" and balance_classes:
        labels = data.targets[idx]
        present = np.unique(labels)
        chosen_classes = rng.choice(present, size=n)
        picks = np.array([rng.choice(idx[labels == c]) for c in chosen_classes])
    else:
        picks = rng.choice(idx, size=n)
    xs, ys = [], []
    aug = {k: augment[k] for k in AUGMENT_KEYS if k in augment}
    aug["use_dihedral"] = augment.get("dihedral", True)
    for i in picks:
        box = T.random_box(data.images[i].shape, T.source_side(data.mpps[i], target_mpp, size), rng)
        xs.append(T.augment_patch(T.crop_resample(data.images[i], box, size), rng, **aug))
        ys.append(_patch_target(data, i, box))
    ys = np.asarray(ys, dtype=np.float64)
    if data.kind != "classification":
        ys = (ys - data.mean) / data.std
    return np.stack(xs), ys
