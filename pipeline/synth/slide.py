"""One synthetic slide: fields from the seed, texture, renderer, pyramid; returns its ground truth.

Same arguments give a byte-identical file, whatever the number of rendering threads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from nic_pipeline.errors import NicError
from nic_pipeline.synth.fields import MASK_DOWNSAMPLE, build_fields
from nic_pipeline.synth.render import Renderer
from nic_pipeline.synth.tiles import TRAIN_SPLIT, TilePools, parse_texture
from nic_pipeline.synth.writer import write_pyramid


@dataclass
class SlideTruth:
    """Ground truth of one written slide. Masks are at 1/``mask_downsample`` of level 0."""

    path: Path
    width: int
    height: int
    mpp: float
    level_dimensions: list[tuple[int, int]]
    requested_lesion_fraction: float
    lesion_fraction: float                 # realized: lesion_mask.sum() / tissue_mask.sum()
    lesion_mask: np.ndarray                # bool (ceil(H/32), ceil(W/32))
    tissue_mask: np.ndarray                # bool, same shape
    pen_mask: np.ndarray                   # bool, same shape (all False without pen marks)
    mask_downsample: int = MASK_DOWNSAMPLE

    @property
    def label(self) -> int:
        """1 for a slide with a lesion, else 0."""
        return int(self.lesion_mask.any())

    @property
    def mask_mpp(self) -> float:
        """µm per mask pixel."""
        return self.mpp * self.mask_downsample


def write_synthetic_slide(path, width: int, height: int, mpp: float = 0.5, seed: int = 0,
                          lesion_fraction: float = 0.0, texture: str = "synthetic",
                          pen_marks: bool = False, *, tile_labels: Path | None = None,
                          lesion_classes: tuple[str, ...] | None = None, tile_mpp: float | None = None,
                          artifacts: bool = False, jpeg_quality: int = 90,
                          progress: bool = False, workers: int | None = None,
                          stain_jitter: float = 0.0, tile_split: str = TRAIN_SPLIT) -> SlideTruth:
    """Write one pyramidal tiled-JPEG Aperio-style TIFF and return its ground truth.

    ``lesion_fraction`` is the lesion area as a share of the tissue area (0 = negative
    slide). ``stain_jitter`` (0 <= s < 1) scales the H and E vectors per slide by ``U(1-s, 1+s)``
    from the seed (:mod:`nic_pipeline.synth.stain`). ``tile_split`` picks the rows of a tile CSV's
    ``split`` column that ``tiles:DIR`` textures draw from. Same arguments -> byte-identical file (whatever
    ``workers``, the number of rendering threads; default: up to 2 CPU cores).
    """
    if width < 1 or height < 1:
        raise NicError(f"{path}: width and height must be positive (got {width} x {height})")
    if not 0 <= lesion_fraction < 1:
        raise NicError(f"{path}: lesion fraction must be in [0, 1) (got {lesion_fraction})")
    if mpp <= 0:
        raise NicError(f"{path}: mpp must be positive (got {mpp})")
    if not 0 <= stain_jitter < 1:
        raise NicError(f"{path}: stain jitter must be in [0, 1) (got {stain_jitter})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with threadpool_limits(limits=1, user_api="blas"):     # tiny matmuls: threads only cost
        return _write_slide(path, width, height, mpp, seed, lesion_fraction, texture, pen_marks,
                            tile_labels, lesion_classes, tile_mpp, artifacts, jpeg_quality, progress,
                            workers if workers is not None else min(2, os.cpu_count() or 1), stain_jitter,
                            tile_split)


def _write_slide(path, width, height, mpp, seed, lesion_fraction, texture, pen_marks,
                 tile_labels, lesion_classes, tile_mpp, artifacts, jpeg_quality, progress, workers,
                 stain_jitter, tile_split) -> SlideTruth:
    """Build the fields and the texture, stream the pyramid to ``path``, return the truth."""
    fields = build_fields(width, height, mpp, seed, lesion_fraction, pen_marks, artifacts)
    tile_dir = parse_texture(texture, tile_labels)
    pools = None
    if tile_dir is not None:
        pools = TilePools(tile_dir, tile_labels, lesion_classes, tile_mpp, mpp, seed,
                          need_lesion=bool(fields.lesion_mask.any()), tile_split=tile_split)
    renderer = Renderer(fields, width, height, mpp, seed, pools, stain_jitter)
    dims = write_pyramid(path, renderer, jpeg_quality, progress, workers)
    tissue_px = int(fields.tissue_mask.sum())
    realized = float(fields.lesion_mask.sum() / tissue_px) if tissue_px else 0.0
    return SlideTruth(
        path=path, width=width, height=height, mpp=mpp, level_dimensions=dims,
        requested_lesion_fraction=float(lesion_fraction), lesion_fraction=realized,
        lesion_mask=fields.lesion_mask, tissue_mask=fields.tissue_mask, pen_mask=fields.pen > 0.5,
    )
