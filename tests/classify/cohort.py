"""A generated compressed cohort for slide-level tests.

It mimics the store written by `nic compress` (Zarr v3 group per slide, features
(feature, y, x) float16 zero off tissue, tissue fraction, µm coordinates, status complete);
positive slides carry a small square of shifted codes among their tissue cells, and a lesion
mask PNG at nic synth's scale (32 level-0 px per mask px).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr
from PIL import Image

GRID, CHANNELS, LESION, CELL_PX, SLIDE_MPP = 32, 16, 8, 128, 0.5
N_SLIDES = 36
MASK_DOWNSAMPLE = 32


def make_cohort(root, n_slides=N_SLIDES, grid=GRID, channels=CHANNELS, seed=0, shift=3.0, lesion_size=LESION):
    """Write cohort.zarr, labels.csv and <slide_id>_lesion.png under ``root``; return paths."""
    rng = np.random.default_rng(seed)
    store, masks = root / "cohort.zarr", root / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    direction = rng.normal(size=channels)
    direction *= shift / np.linalg.norm(direction) * np.sqrt(channels) / 2
    base = rng.normal(size=channels)
    rows = []
    yy, xx = np.mgrid[0:grid, 0:grid] + 0.5
    for i in range(n_slides):
        sid, label = f"slide-{i:03d}", i % 2
        cy, cx = rng.uniform(0.4, 0.6, 2) * grid
        ry, rx = rng.uniform(0.3, 0.45, 2) * grid
        radius = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        tissue = np.clip((1.15 - radius) / 0.3, 0, 1).astype(np.float32)
        codes = base[:, None, None] + rng.normal(size=(channels, grid, grid))
        lesion = np.zeros((grid, grid), bool)
        if label:
            inside = np.argwhere(tissue[:-lesion_size, :-lesion_size] >= 1)
            inside = inside[[tissue[y:y + lesion_size, x:x + lesion_size].min() >= 1 for y, x in inside]]
            y0, x0 = inside[rng.integers(len(inside))]
            lesion[y0:y0 + lesion_size, x0:x0 + lesion_size] = True
            codes[:, lesion] += direction[:, None]
        encoded = tissue >= 0.1
        codes[:, ~encoded] = 0
        px = CELL_PX // MASK_DOWNSAMPLE
        Image.fromarray((np.kron(lesion, np.ones((px, px))) * 255).astype(np.uint8)).save(masks / f"{sid}_lesion.png")
        centres = (np.arange(grid) + 0.5) * CELL_PX * SLIDE_MPP
        ds = xr.Dataset(
            {"features": (("feature", "y", "x"), codes.astype(np.float16)), "tissue": (("y", "x"), tissue)},
            coords={"y": centres, "x": centres, "feature": np.arange(channels)},
            attrs=dict(encoder="synthetic-codes", encoder_sha256="0" * 64, code_dim=channels, mpp=SLIDE_MPP,
                       slide_mpp=SLIDE_MPP, patch_size=CELL_PX, stride=CELL_PX, min_tissue=0.1, status="complete"),
        )
        ds.to_zarr(store, group=sid, mode="w", zarr_format=3, consolidated=False)
        rows.append({"slide_id": sid, "label": label, "group": f"patient-{i // 2:03d}"})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return store, labels, masks
