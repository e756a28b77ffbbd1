"""Tile datasets: reading labelled tiles, resampling them to an encoder's µm/px, embedding them.

Used by ``nic train-encoder`` (random crops of labelled tiles at 0.5 µm/px) and ``nic embed``
(tiles -> codes of any registry encoder). Tiles are small (a few hundred px) so they are read
with Pillow into memory; whole slides go through :mod:`nic_pipeline.io` instead.

Resampling is one rule everywhere: a patch of ``size`` px at ``target_mpp`` covers
``size * target_mpp / src_mpp`` source px; that (fractional) box is cut out and resized with
Pillow's antialiasing bilinear filter. Tiles coarser than the target (LC25000 at ~1.7 µm/px) are
therefore *upsampled*: no detail is gained, the patch just covers the right field of view.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from skimage.color import hed2rgb, rgb2hed
from skimage.filters import gaussian
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from nic_models.dihedral import dihedral
from nic_pipeline.compress.codes import encode_patches
from nic_pipeline.encoder.macenko import macenko_augment
from nic_pipeline.errors import NicError
from nic_pipeline.runtime.progress import progress_bar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


# --------------------------------------------------------------------------- reading


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB ``(h, w, 3)`` (alpha and palette dropped)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # Pillow cannot read some TIFFs: fall back to tifffile
        try:
            arr = tifffile.imread(path)
        except Exception:
            raise NicError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted, as paths relative to ``root``."""
    root = Path(root)
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_tile_list(tiles: str | Path, path_column: str = "path") -> tuple[Path, list[str]]:
    """``(root, relative paths)`` of a tile folder (recursive) or of a CSV with a path column.

    CSV paths are relative to the CSV's folder (absolute paths are kept as they are).
    """
    tiles = Path(tiles)
    if tiles.is_dir():
        paths = [p.as_posix() for p in list_images(tiles)]
        if not paths:
            raise NicError(f"{tiles}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
        return tiles, paths
    if tiles.suffix.lower() == ".csv":
        table = pd.read_csv(tiles)
        if path_column not in table.columns:
            raise NicError(f"{tiles}: no {path_column!r} column (columns: {list(table.columns)})")
        return tiles.parent, [str(p) for p in table[path_column]]
    raise NicError(f"{tiles}: expected a folder of tiles or a CSV with a {path_column!r} column")


def dataset_sha256(paths: Iterable[str | Path], root: str | Path) -> str:
    """sha256 over the sorted relative file names and their contents: one hash for a data set."""
    root = Path(root)
    h = hashlib.sha256()
    for rel in sorted(Path(p).relative_to(root).as_posix() if Path(p).is_absolute() else Path(p).as_posix()
                      for p in paths):
        h.update(rel.encode() + b"\0")
        h.update((root / rel).read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- labelled sources


def _label_from_name(name: str, regex: str | None) -> str | None:
    if regex is None:
        return None
    match = re.search(regex, name)
    return match.group(1) if match else None


def read_source(source: dict, data_root: str | Path) -> pd.DataFrame:
    """One data source of a task config -> table ``path, label|value, group, mpp[, mask]``.

    Source kinds (keys of ``source``):

    * ``folders: DIR`` -- classification, one sub-folder per class;
    * ``files: DIR`` + ``label_regex`` -- classification, class from the file name (first group);
    * ``csv: FILE`` (+ ``root``) -- columns ``path`` and ``label`` (classification) or ``value``
      (regression), optional group column (``group_column``, default ``group``); ``split_column``
      + ``split`` keep only the rows of one split (PCam: ``split: train``, never its ``valid``);
    * ``images: DIR`` + ``masks: DIR`` -- images with a binary mask of the same stem.

    Optional: ``label_map`` (rename / merge classes; classes mapped to null are dropped),
    ``group_regex`` (group from the file name), ``group_by_content`` (byte-identical files share
    a group, so duplicates never sit on both sides of a split), ``mpp`` (required: the tiles'
    µm/px), ``min_size`` (drop smaller tiles).
    """
    data_root = Path(data_root)
    if "mpp" not in source:
        raise NicError(f"data source {source}: says no 'mpp' (µm/px); state it, or what to assume")
    if "folders" in source:
        root = data_root / source["folders"]
        rels = list_images(root)
        table = pd.DataFrame({"path": [str(root / r) for r in rels],
                              "label": [r.parts[0] if len(r.parts) > 1 else None for r in rels]})
    elif "files" in source:
        root = data_root / source["files"]
        rels = list_images(root)
        table = pd.DataFrame({"path": [str(root / r) for r in rels],
                              "label": [_label_from_name(r.name, source.get("label_regex")) for r in rels]})
    elif "csv" in source:
        csv = data_root / source["csv"]
        root = data_root / source.get("root", Path(source["csv"]).parent)
        raw = _csv_rows(csv, source)
        table = pd.DataFrame({"path": [str(root / p) for p in raw["path"]]})
        for column in ("label", "value"):
            if column in raw.columns:
                table[column] = raw[column].to_numpy()
        group_column = source.get("group_column", "group")
        if group_column in raw.columns:
            table["group"] = raw[group_column].astype(str).to_numpy()
    elif "images" in source:
        root = data_root / source["images"]
        mask_root = data_root / source["masks"]
        rels = list_images(root)
        masks = {p.stem: mask_root / p for p in list_images(mask_root)}
        rels = [r for r in rels if r.stem in masks]
        table = pd.DataFrame({"path": [str(root / r) for r in rels],
                              "mask": [str(masks[r.stem]) for r in rels]})
    else:
        raise NicError(f"data source {source}: needs one of folders / files / csv / images")
    if not len(table):
        raise NicError(f"data source {source}: no tiles found under {data_root}")
    if "label" in table.columns:
        if "label_map" in source:
            table["label"] = table["label"].map(lambda v: source["label_map"].get(v, v))
        table = table[table["label"].notna()]
        table["label"] = table["label"].astype(str)
    if source.get("group_by_content"):
        table["group"] = table["path"].map(lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16])
    if "group" not in table.columns:
        names = table["path"].map(lambda p: Path(p).name)
        if source.get("group_regex"):
            table["group"] = names.map(lambda n: _label_from_name(n, source["group_regex"]) or n)
        else:
            table["group"] = names  # every tile its own group
    table["group"] = source.get("name", root.name) + ":" + table["group"].astype(str)
    table["mpp"] = float(source["mpp"])
    table["root"] = str(root)
    return table.reset_index(drop=True)


def _csv_rows(csv: Path, source: dict) -> pd.DataFrame:
    """The rows of a source CSV, only those of ``source["split"]`` when ``split_column`` is given."""
    raw = pd.read_csv(csv)
    column = source.get("split_column")
    if column is None:
        return raw
    if column not in raw.columns or "split" not in source:
        raise NicError(f"{csv}: split_column {column!r} needs that column and a 'split' value "
                       f"(columns: {list(raw.columns)})")
    return raw[raw[column].astype(str) == str(source["split"])].reset_index(drop=True)


# --------------------------------------------------------------------------- resampling


def prepare_image(image: np.ndarray, src_mpp: float, target_mpp: float,
                  mask: np.ndarray | None = None):
    """Downsample an image finer than ``target_mpp`` once, up front: ``(image, mpp, mask)``.

    Images coarser than the target are kept as they are (crops are upsampled on the fly), so
    memory stays at the smaller of the two resolutions. A mask is resampled as a float
    (area average), so it keeps the fraction of positive pixels.
    """
    if src_mpp >= target_mpp * 0.999:
        return image, src_mpp, mask
    h, w = image.shape[:2]
    new = (max(1, round(w * src_mpp / target_mpp)), max(1, round(h * src_mpp / target_mpp)))
    image = np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR, reducing_gap=None))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask.astype(np.float32), mode="F").resize(new, Image.BOX))
    return image, src_mpp * w / new[0], mask


def source_side(src_mpp: float, target_mpp: float, size: int) -> float:
    """Side, in source px, of a ``size`` px patch at ``target_mpp``."""
    return size * target_mpp / src_mpp


def random_box(shape: Sequence[int], side: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """A uniformly placed square ``(x0, y0, side)`` inside an image of ``shape`` (centred if too big)."""
    h, w = shape[:2]
    x0 = rng.uniform(0, w - side) if w > side else (w - side) / 2
    y0 = rng.uniform(0, h - side) if h > side else (h - side) / 2
    return float(x0), float(y0), float(side)


def grid_boxes(shape: Sequence[int], side: float, n: int) -> list[tuple[float, float, float]]:
    """``n x n`` evenly spaced squares covering the image (one centred square for ``n=1``)."""
    h, w = shape[:2]
    xs = [(w - side) / 2] if n == 1 or w <= side else list(np.linspace(0, w - side, n))
    ys = [(h - side) / 2] if n == 1 or h <= side else list(np.linspace(0, h - side, n))
    return [(float(x), float(y), float(side)) for y in ys for x in xs]


def crop_resample(image: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    """Cut the (fractional) square ``box`` out of ``image`` and resize it to ``size`` px.

    Where the box reaches past the image (tile smaller than the patch), the image is
    reflect-padded first.
    """
    x0, y0, side = box
    h, w = image.shape[:2]
    pad = int(np.ceil(max(0.0, -x0, -y0, x0 + side - w, y0 + side - h)))
    if pad:
        image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect" if pad < min(h, w) else "edge")
        x0, y0 = x0 + pad, y0 + pad
    pil = Image.fromarray(image)
    out = pil.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side), reducing_gap=None)
    return np.asarray(out)


def box_mean(mask: np.ndarray, box: tuple[float, float, float]) -> float:
    """Mean of ``mask`` inside ``box`` (pixel-rounded): e.g. the nucleus fraction of a patch."""
    x0, y0, side = box
    h, w = mask.shape
    xa, ya = max(0, int(round(x0))), max(0, int(round(y0)))
    xb, yb = min(w, int(round(x0 + side))), min(h, int(round(y0 + side)))
    return float(mask[ya:yb, xa:xb].mean())


# --------------------------------------------------------------------------- augmentation


def augment_patch(patch: np.ndarray, rng: np.random.Generator, hed_sigma: float = 0.05,
                  brightness: float = 0.1, contrast: float = 0.1, blur_p: float = 0.2,
                  blur_sigma: float = 1.0, use_dihedral: bool = True, macenko_scale: float = 0.0,
                  macenko_shift: float = 0.0) -> np.ndarray:
    """Random rotation/flip, HED and/or Macenko stain jitter, brightness/contrast and Gaussian
    blur (uint8 in/out).

    HED jitter follows Tellez et al. (MedIA 2019, "Quantifying the effects of data augmentation
    and stain color normalization"): each of the H, E, D channels of ``skimage.color.rgb2hed``
    is scaled by ``1 + U(-s, s)`` and shifted by ``U(-s, s)`` times its spread. Macenko jitter
    (:func:`nic_pipeline.encoder.macenko.macenko_augment`) scales and shifts the concentrations of
    the patch's own fitted H and E vectors; either is off at 0.
    """
    if use_dihedral:
        patch = dihedral(patch, int(rng.integers(8)), dims=(0, 1))
    x = patch.astype(np.float32) / 255.0
    if hed_sigma > 0:
        hed = rgb2hed(x)
        alpha = rng.uniform(1 - hed_sigma, 1 + hed_sigma, size=3)
        beta = rng.uniform(-hed_sigma, hed_sigma, size=3) * (hed.std(axis=(0, 1)) + 1e-6)
        x = hed2rgb(hed * alpha + beta).astype(np.float32)
    if macenko_scale > 0 or macenko_shift > 0:
        x = macenko_augment(x, rng, macenko_scale, macenko_shift)
    if brightness > 0 or contrast > 0:
        mean = x.mean()
        x = (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean + rng.uniform(-brightness, brightness)
    if blur_p > 0 and rng.random() < blur_p:
        x = gaussian(x, sigma=rng.uniform(0.1, blur_sigma), channel_axis=-1, preserve_range=True)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- splitting


def group_split(groups: Sequence[str], labels: Sequence | None, val_fraction: float,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices with every group wholly on one side.

    Stratified by label where labels are given (``StratifiedGroupKFold``, first fold), else a
    ``GroupShuffleSplit``. LC25000 tiles of one group are copies of one original and MoNuSeg
    patches of one image are one sample: splitting by tile would leak.
    """
    groups = np.asarray(groups)
    idx = np.arange(len(groups))
    n_groups = len(np.unique(groups))
    if val_fraction <= 0 or n_groups < 2:
        return idx, idx[:0]
    n_splits = max(2, min(n_groups, int(round(1 / val_fraction))))
    if labels is not None:
        labels = np.asarray(labels)
        _, counts = np.unique(labels, return_counts=True)
        n_splits = max(2, min(n_splits, int(counts.max())))  # tiny sets: fewer, larger folds
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train, val = next(splitter.split(idx, labels, groups))
    else:
        splitter = GroupShuffleSplit(n_splits=1, test_size=1 / n_splits, random_state=seed)
        train, val = next(splitter.split(idx, groups=groups))
    return np.sort(train), np.sort(val)


# --------------------------------------------------------------------------- embedding


def tile_patches(image: np.ndarray, src_mpp: float, target_mpp: float, size: int,
                 crops: int = 1) -> np.ndarray:
    """``crops x crops`` patches of ``size`` px at ``target_mpp`` evenly covering a tile."""
    side = source_side(src_mpp, target_mpp, size)
    return np.stack([crop_resample(image, box, size) for box in grid_boxes(image.shape, side, crops)])


def embed_tiles(root: str | Path, paths: Sequence[str], encoder, mpp: float | None = None,
                crops: int = 1, batch_size: int = 64, progress: bool = True, precision: str = "auto") -> np.ndarray:
    """Codes ``(N, C)`` of tiles with ``encoder``: each tile resampled to the encoder's µm/px.

    ``mpp`` is the tiles' µm/px; ``None`` means they are already at the encoder's µm/px.
    With ``crops > 1`` the code is the mean over ``crops x crops`` patches spread over the tile
    (tiles larger than one patch); with ``crops=1`` it is the centre patch. Patches go through
    the runner ``nic compress`` uses (:func:`nic_pipeline.compress.codes.encode_patches`), at
    ``precision`` (``auto``: what the hardware allows), so a patch gets the code it has in a store.
    """
    root = Path(root)
    spec = encoder.spec
    src_mpp = float(mpp) if mpp else float(spec.mpp)
    out, batch, owners = [], [], []

    def flush():
        codes = encode_patches(encoder, np.stack(batch), precision, batch_size).astype(np.float32)
        owners_arr = np.asarray(owners)
        for tile in np.unique(owners_arr):  # a tile never spans two batches
            out.append(codes[owners_arr == tile].mean(axis=0))
        batch.clear()
        owners.clear()

    encoder.eval()
    for i, rel in enumerate(progress_bar(paths, desc=f"embed {spec.name}", unit="tile", disable=not progress)):
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        if not path.is_file():
            raise NicError(f"{path}: tile not found")
        for patch in tile_patches(read_rgb(path), src_mpp, spec.mpp, spec.patch_size, crops):
            batch.append(patch)
            owners.append(i)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return np.stack(out).astype(np.float32)


def write_features(out: str | Path, features: np.ndarray, paths: Sequence[str], **meta) -> Path:
    """Save ``features (N, C)``, ``paths (N,)`` and scalar metadata to an ``.npz``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {k: np.asarray(v) for k, v in meta.items() if v is not None}
    np.savez(out, features=features, paths=np.asarray(paths, dtype=str), **extra)
    return out
