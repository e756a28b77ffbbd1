"""Cohorts of synthetic slides: which slides are positive, the slides, their masks and labels.

``write_cohort`` writes ``synth_NNN.tif`` with ``_lesion.png`` / ``_tissue.png`` masks (read
back with :mod:`nic_pipeline.io.masks`), ``labels.csv`` and ``synth.json`` (the spec and per-slide
seeds), all from one seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nic_pipeline.errors import NicError
from nic_pipeline.io.masks import mask_path, read_mask, write_mask
from nic_pipeline.runtime.progress import progress_bar
from nic_pipeline.synth.fields import MASK_DOWNSAMPLE
from nic_pipeline.synth.slide import SlideTruth, write_synthetic_slide
from nic_pipeline.synth.tiles import TRAIN_SPLIT


@dataclass(frozen=True)
class CohortSpec:
    """What `nic synth` writes: N slides, a share of them positive, all from one seed."""

    n_slides: int = 4
    width: int = 8192
    height: int = 8192
    mpp: float = 0.5
    lesion_fraction: float = 0.05
    positive_fraction: float = 0.5
    seed: int = 0
    texture: str = "synthetic"
    tile_labels: Path | None = None
    tile_split: str = TRAIN_SPLIT    # rows of the tile CSV's `split` column to draw from
    lesion_classes: tuple[str, ...] | None = None
    pen_marks: bool = False
    tile_mpp: float | None = None
    artifacts: bool = False
    jpeg_quality: int = 90
    workers: int | None = None       # rendering threads per slide (None: up to 2 cores)
    stain_jitter: float = 0.0        # per-slide H and E vector scaling U(1-s, 1+s); 0: off


def write_masks(truth: SlideTruth) -> tuple[Path, Path]:
    """Write <slide>_lesion.png and <slide>_tissue.png (0/255, 1 px = MASK_DOWNSAMPLE level-0 px)."""
    return tuple(
        write_mask(mask_path(truth.path, kind), mask, truth.mask_downsample, slide_size=f"{truth.width}x{truth.height}")
        for kind, mask in (("lesion", truth.lesion_mask), ("tissue", truth.tissue_mask))
    )


def read_lesion_mask(path) -> np.ndarray:
    """Lesion mask (bool, 1 px = MASK_DOWNSAMPLE level-0 px) of a slide or its _lesion.png."""
    return read_mask(path, "lesion")


def read_tissue_mask(path) -> np.ndarray:
    """Tissue mask (bool, same grid as the lesion mask) of a slide or its _tissue.png."""
    return read_mask(path, "tissue")


def cohort_assignment(n_slides: int, positive_fraction: float, seed: int) -> np.ndarray:
    """Which slides are positive: exactly round(n * fraction), chosen from the seed."""
    n_pos = int(round(n_slides * positive_fraction))
    labels = np.zeros(n_slides, int)
    labels[np.random.default_rng([seed, 2718]).permutation(n_slides)[:n_pos]] = 1
    return labels


def write_cohort(out_dir, spec: CohortSpec, progress: bool = False):
    """Write OUT_DIR/synth_NNN.tif, their masks, labels.csv and synth.json; return the labels."""
    if spec.n_slides < 1:
        raise NicError(f"{out_dir}: --slides must be at least 1")
    if not 0 <= spec.positive_fraction <= 1:
        raise NicError(f"{out_dir}: --positive-fraction must be in [0, 1]")
    if spec.positive_fraction > 0 and not 0 < spec.lesion_fraction < 1:
        raise NicError(f"{out_dir}: --lesion-fraction must be in (0, 1) for positive slides")
    if not 0 <= spec.stain_jitter < 1:
        raise NicError(f"{out_dir}: --stain-jitter must be in [0, 1)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = cohort_assignment(spec.n_slides, spec.positive_fraction, spec.seed)
    rows, details = [], []
    digits = max(3, len(str(spec.n_slides - 1)))
    for i in progress_bar(range(spec.n_slides), desc="slides", unit="slide", disable=not progress):
        slide_id = f"synth_{i:0{digits}d}"
        slide_seed = int(np.random.SeedSequence([spec.seed, i]).generate_state(1)[0])
        truth = write_synthetic_slide(
            out_dir / f"{slide_id}.tif", spec.width, spec.height, spec.mpp, slide_seed,
            spec.lesion_fraction if labels[i] else 0.0, spec.texture, spec.pen_marks,
            tile_labels=spec.tile_labels, lesion_classes=spec.lesion_classes, tile_mpp=spec.tile_mpp,
            artifacts=spec.artifacts, jpeg_quality=spec.jpeg_quality, progress=progress,
            workers=spec.workers, stain_jitter=spec.stain_jitter, tile_split=spec.tile_split,
        )
        write_masks(truth)
        rows.append({"slide_id": slide_id, "label": truth.label, "lesion_fraction": truth.lesion_fraction})
        details.append({"slide_id": slide_id, "seed": slide_seed, "tissue_px": int(truth.tissue_mask.sum()),
                        "lesion_px": int(truth.lesion_mask.sum())})
    table = pd.DataFrame(rows, columns=["slide_id", "label", "lesion_fraction"])
    table.to_csv(out_dir / "labels.csv", index=False)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()}
    (out_dir / "synth.json").write_text(json.dumps(
        {"spec": meta, "mask_downsample": MASK_DOWNSAMPLE, "slides": details}, indent=2))
    return table
