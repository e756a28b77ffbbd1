"""Real tiles as slide texture (``--texture tiles:DIR``): pools of normal and lesion tiles at the
slide's µm/px, and feather-blended mosaics of them over any region at downsample 1 or 4.

Tiles come from class sub-folders or a ``path,label`` CSV; tumour-like class names make the
lesion pool, background-like names are dropped, the rest is normal tissue. A CSV with a
``split`` column (PCam's ``labels.csv``) gives only the rows of one split: ``train`` by default, so
that slides never show the tiles held out for validation; ``valid`` for slides that an encoder
trained on the ``train`` rows has never seen (``--tile-split valid``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from nic_models.dihedral import dihedral
from nic_pipeline.errors import NicError
from nic_pipeline.synth.noise import hash01, value_noise

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}
LESION_WORDS = ("tumor", "tumour", "tum", "aca", "scc", "carcinoma", "cancer", "malignant", "metasta")
BACKGROUND_WORDS = ("empty", "back", "background", "blank", "glass")
# PCam: Camelyon16 scans at 40x (0.243 µm/px) downsampled 4x (Veeling et al. 2018)
KNOWN_TILE_MPP = {"kather2016": 0.495, "nct_crc": 0.5, "nct-crc": 0.5, "lc25000": 1.7, "pcam": 0.972}
TRAIN_SPLIT = "train"         # default rows of a tile CSV's `split` column that slides may use
# Real tiles kept per role (normal / lesion) per slide: enough that an 8192² slide of 186 px
# PCam tiles (~1,500 tissue tiles) shows each tile about 3 times, not 50 (a haystack of a few
# repeated normal tiles is unrealistically uniform); ~100 MB of pixels per role at most.
MAX_POOL = 512


def _guess_tile_mpp(source: str) -> float:
    """µm/px of a known tile data set named in ``source``; 0.5 when none is recognised."""
    low = source.lower()
    for name, mpp in KNOWN_TILE_MPP.items():
        if name in low:
            return mpp
    return 0.5


def _is_lesion(label: str, lesion_classes) -> bool:
    """Whether a tile class is lesion: listed in ``lesion_classes``, else named like a tumour."""
    if lesion_classes is not None:
        return label in lesion_classes
    low = label.lower()
    return any(w in low for w in LESION_WORDS)


def _is_background(label: str) -> bool:
    """Whether a tile class is glass or empty background (left out of the pools)."""
    low = label.lower()
    return any(w in low for w in BACKGROUND_WORDS)


def list_tiles(directory: Path, tile_labels: Path | None = None,
               split: str = TRAIN_SPLIT) -> list[tuple[Path, str]]:
    """(path, class) of every tile: class sub-folders of DIR, or a path,label[,group][,split] CSV
    (only its ``split`` rows when it has a split column)."""
    directory = Path(directory)
    if tile_labels is not None:
        table = pd.read_csv(tile_labels)
        if not {"path", "label"} <= set(table.columns):
            raise NicError(f"{tile_labels}: needs columns path,label (got {', '.join(table.columns)})")
        if "split" in table.columns:
            splits = sorted(set(table["split"].astype(str)))
            table = table[table["split"].astype(str) == split]
            if table.empty:
                raise NicError(f"{tile_labels}: no rows with split '{split}' (it has {', '.join(splits)})")
        out = []
        for p, label in zip(table["path"], table["label"]):
            path = Path(p)
            if not path.is_absolute():
                path = directory / p if (directory / p).exists() else Path(tile_labels).parent / p
            out.append((path, str(label)))
        return out
    if not directory.is_dir():
        raise NicError(f"{directory}: tile folder not found (use --texture tiles:DIR with class sub-folders)")
    out = [(p, sub.name) for sub in sorted(directory.iterdir()) if sub.is_dir()
           for p in sorted(sub.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not out:
        raise NicError(f"{directory}: no tiles in class sub-folders (or give --tile-labels CSV)")
    return out


def _roles(entries, lesion_classes, directory, need_lesion: bool) -> dict[str, list[Path]]:
    """Tile paths per role: ``lesion`` (tumour-like classes) and ``normal`` (the rest but background)."""
    roles = {"normal": [], "lesion": []}
    for path, label in entries:
        if _is_lesion(label, lesion_classes):
            roles["lesion"].append(path)
        elif not _is_background(label):
            roles["normal"].append(path)
    if not roles["normal"]:
        raise NicError(f"{directory}: no normal (non-lesion, non-background) tiles; check --lesion-classes")
    if need_lesion and not roles["lesion"]:
        classes = sorted({label for _, label in entries})
        raise NicError(f"{directory}: no lesion tiles among classes {classes}; name them with --lesion-classes")
    return roles


def _span(pixels: np.ndarray, first: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of ``pixels`` in a tile whose first pixel is ``first``, and which of them fall inside it."""
    offsets = pixels - first
    return offsets, np.nonzero((offsets >= 0) & (offsets < size))[0]


class TilePools:
    """Normal and lesion tiles (uint8) rescaled to the slide's µm/px at downsamples 1 and 4."""

    OVERLAP = 0.12

    def __init__(self, directory, tile_labels, lesion_classes, tile_mpp, mpp, seed, need_lesion,
                 tile_split=TRAIN_SPLIT):
        entries = list_tiles(directory, tile_labels, tile_split)
        self.tile_mpp = tile_mpp if tile_mpp else _guess_tile_mpp(f"{directory} {tile_labels or ''}")
        classes = dict(entries)
        rng = np.random.default_rng([seed, 31337])
        self.size0 = None
        self.images: dict[str, dict[int, list[np.ndarray]]] = {}
        self.classes: dict[str, np.ndarray] = {}
        for role, paths in _roles(entries, lesion_classes, directory, need_lesion).items():
            if not paths:
                continue
            chosen = [paths[i] for i in sorted(rng.choice(len(paths), min(MAX_POOL, len(paths)), replace=False))]
            names = sorted({classes[p] for p in chosen})
            self.classes[role] = np.array([names.index(classes[p]) for p in chosen])
            self.images[role] = self._load(chosen, mpp)
        self.stride0 = max(4, int(round(self.size0 * (1 - self.OVERLAP))))

    def _load(self, paths, mpp) -> dict[int, list[np.ndarray]]:
        """Square crops of the tiles resized to ``size0`` px (downsample 1) and ``size0 / 4`` px (4).

        The first tile loaded fixes ``size0``: its side at the slide's µm/px.
        """
        images = {1: [], 4: []}
        for path in paths:
            with Image.open(path) as im:
                im = im.convert("RGB")
                side = min(im.size)
                im = im.crop((0, 0, side, side))
                if self.size0 is None:
                    self.size0 = max(8, int(round(side * self.tile_mpp / mpp)))
                for d in (1, 4):
                    sd = max(2, int(round(self.size0 / d)))
                    images[d].append(np.asarray(im.resize((sd, sd), Image.Resampling.BICUBIC)))
        return images

    def _pick(self, role, gi, gj, key) -> np.ndarray:
        """Tile index per mosaic cell: classes form patches a few tiles wide, tiles vary within."""
        cls = self.classes[role]
        n_cls = int(cls.max()) + 1
        yc = (gi.ravel() + 0.5) * 1.0
        xc = (gj.ravel() + 0.5) * 1.0
        score = np.stack([value_noise(yc, xc, 3.5, key + np.uint64(100 + c)) for c in range(n_cls)])
        chosen_cls = score.argmax(axis=0)
        u = hash01(gi, gj, key)
        members = [np.nonzero(cls == c)[0] for c in range(n_cls)]
        counts = np.array([len(m) for m in members])
        k = (u * counts[chosen_cls]).astype(int)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        order = np.concatenate(members)
        return order[offsets[chosen_cls] + k]

    def mosaic(self, role, ys0, xs0, d, key) -> np.ndarray:
        """Feather-blended mosaic of this role's tiles over the pixels ys0 x xs0 (level-0 coords)."""
        images = self.images[role][d]
        sd = images[0].shape[0]
        st = self.stride0
        margin = (self.size0 - st) / 2
        h, w = len(ys0), len(xs0)
        acc = np.zeros((h, w, 3), np.float32)
        wsum = np.zeros((h, w), np.float32)
        ramp = max(1.0, 2 * margin / d)
        t = np.arange(sd) + 0.5
        win = np.clip(np.minimum(t, sd - t) / ramp, 0.02, 1).astype(np.float32)
        # level-d pixel index of each output pixel
        py = np.floor(ys0 / d).astype(np.int64)
        px = np.floor(xs0 / d).astype(np.int64)
        i_lo = int(np.floor((ys0[0] + margin - self.size0) / st))
        i_hi = int(np.floor((ys0[-1] + margin) / st))
        j_lo = int(np.floor((xs0[0] + margin - self.size0) / st))
        j_hi = int(np.floor((xs0[-1] + margin) / st))
        gi = np.arange(i_lo, i_hi + 1)[:, None]
        gj = np.arange(j_lo, j_hi + 1)[None, :]
        pick = self._pick(role, gi, gj, key)
        flip = (hash01(gi, gj, key + np.uint64(1)) * 8).astype(int)
        for a, i in enumerate(range(i_lo, i_hi + 1)):
            rows, rsel = _span(py, int(np.floor((i * st - margin) / d)), sd)
            if rsel.size == 0:
                continue
            for b, j in enumerate(range(j_lo, j_hi + 1)):
                cols, csel = _span(px, int(np.floor((j * st - margin) / d)), sd)
                if csel.size == 0:
                    continue
                img = images[pick[a, b]]
                img = dihedral(img, int(flip[a, b]), dims=(0, 1))
                r0, r1 = rsel[0], rsel[-1] + 1
                c0, c1 = csel[0], csel[-1] + 1
                patch = img[rows[r0]:rows[r1 - 1] + 1, cols[c0]:cols[c1 - 1] + 1]
                wgt = win[rows[r0]:rows[r1 - 1] + 1, None] * win[None, cols[c0]:cols[c1 - 1] + 1]
                if patch.shape[:2] != (r1 - r0, c1 - c0):      # d does not divide: index exactly
                    patch = img[rows[r0:r1]][:, cols[c0:c1]]
                    wgt = win[rows[r0:r1], None] * win[None, cols[c0:c1]]
                acc[r0:r1, c0:c1] += wgt[..., None] * patch
                wsum[r0:r1, c0:c1] += wgt
        return acc / np.maximum(wsum, 1e-6)[..., None]


def parse_texture(texture: str, tile_labels: Path | None) -> Path | None:
    """None for 'synthetic', else the tile folder of 'tiles:DIR' (or 'tiles' + a labels CSV)."""
    if texture == "synthetic":
        return None
    if texture.startswith("tiles"):
        rest = texture[len("tiles"):].lstrip(":")
        if rest:
            return Path(rest)
        if tile_labels is not None:
            return Path(tile_labels).parent
    raise NicError(f"unknown texture {texture!r}: use 'synthetic' or 'tiles:DIR'")
