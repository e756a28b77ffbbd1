"""Stains fitted on slides: each slide's own (once per slide, on the worker that finds its tissue),
a reference slide's or image's, and a cohort's (the median over its slides), for ``nic compress
--stain-norm METHOD --stain-target REFERENCE|cohort``.

A slide's stain is fitted on an even sample of its tissue cells read at the grid's µm/px (the
pixels the encoder sees): colours at the 8 µm/px of the tissue mask are averages of nuclei and
stroma, and Macenko's haematoxylin vector found there is off by about 20° (docs/compress.md).
The target is settled on the client before any block is encoded and travels in the compression
settings; a cohort target already in a store is kept, so adding slides to it later is not refused.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from nic_pipeline.compress.grid import Grid, cell_coverage
from nic_pipeline.compress.jobs import SlideJob, plan_jobs, slide_mpp
from nic_pipeline.compress.stain import METHODS, Stain, fit_stain, median_stain
from nic_pipeline.compress.store import CompressionConfig
from nic_pipeline.compress.tissue import slide_tissue_mask
from nic_pipeline.errors import NicError, SlideError
from nic_pipeline.io import SUFFIXES, open_slide

SAMPLE_CELLS = 64
"""Tissue cells a slide's stain is fitted on (about a million pixels of 128 px patches)."""
COHORT_SLIDES = 64
"""Slides, evenly spread over the run's, whose median is a cohort target."""
COHORT = "cohort"


def sample_cells(tissue: np.ndarray, min_tissue: float, n: int = SAMPLE_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of at most ``n`` cells evenly spread (row-major) over those with enough tissue."""
    rows, cols = np.nonzero(tissue >= min_tissue)
    pick = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int))
    return rows[pick], cols[pick]


def slide_stain(slide, grid: Grid, tissue: np.ndarray, min_tissue: float, method: str) -> Stain | None:
    """The slide's own stain, from :data:`SAMPLE_CELLS` of its tissue cells (None: too little tissue)."""
    rows, cols = sample_cells(tissue, min_tissue)
    if not len(rows):
        return None
    xs, ys = grid.cell_origin_px(rows, cols)
    patches = slide.read_regions_at_mpp(list(zip(xs.tolist(), ys.tolist())), grid.patch_size, grid.mpp)
    return fit_stain(method, patches)


def source_stain_attrs(slide, grid: Grid, tissue: np.ndarray, config: CompressionConfig) -> dict:
    """The slide attribute that records its own stain (``stain_source``, None when it could not be
    fitted: its patches are encoded as they are); nothing when normalisation is off."""
    if config.stain_norm == "none":
        return {}
    stain = slide_stain(slide, grid, tissue, config.min_tissue, config.stain_norm)
    return {"stain_source": None if stain is None else list(stain.values)}


def file_stain(job: SlideJob, method: str, config: CompressionConfig) -> Stain | None:
    """The stain of one slide file, fitted as the workers fit it (None: too little tissue);
    raises SlideError for a slide that cannot be read or has no µm/px."""
    with open_slide(job.path) as slide:
        slide.mpp = slide_mpp(slide.mpp, job)[0]
        grid = Grid(*slide.dimensions, slide.mpp, config.mpp, config.patch_size, config.stride)
        if 0 in grid.shape:
            return None
        mask, mask_mpp = slide_tissue_mask(slide, mask_mpp=config.mask_mpp, require_tissue=False)
        tissue = np.asarray(cell_coverage(mask, mask_mpp, grid.cell_um, grid.shape))
        return slide_stain(slide, grid, tissue, config.min_tissue, method)


def job_stain(job: SlideJob, method: str, config: CompressionConfig) -> Stain | None:
    """Task of a cohort fit: :func:`file_stain`, with None for a slide that cannot be used (the
    run reports it when it gets to it)."""
    try:
        return file_stain(job, method, config)
    except NicError:
        return None


def reference_stain(path: str | os.PathLike, method: str, config: CompressionConfig, mpp: float | None = None) -> Stain:
    """The stain of a reference slide (fitted as a slide is) or image (PNG/JPEG, on its tissue pixels)."""
    path = Path(path)
    if not path.is_file():
        raise NicError(f"--stain-target {path}: no such file (give a reference slide or image, or '{COHORT}')")
    if path.suffix.lower() in SUFFIXES:
        [job] = plan_jobs([path], mpp=mpp)
        if job.problem:
            raise NicError(f"--stain-target {path}: {job.problem}")
        try:
            stain = file_stain(job, method, config)
        except SlideError as err:
            raise NicError(f"--stain-target {path}: {err.reason}") from err
    else:
        try:
            with Image.open(path) as image:
                stain = fit_stain(method, np.asarray(image.convert("RGB")))
        except OSError as err:
            raise NicError(f"--stain-target {path}: not a slide or an image ({err})") from err
    if stain is None:
        raise NicError(f"--stain-target {path}: too little tissue to fit a {method} stain")
    return stain


def cohort_stain(client, jobs: list[SlideJob], method: str, config: CompressionConfig) -> Stain:
    """The median stain of up to :data:`COHORT_SLIDES` of the run's slides, fitted on the workers."""
    usable = [job for job in jobs if not job.problem]
    pick = np.unique(np.linspace(0, len(usable) - 1, min(COHORT_SLIDES, len(usable))).round().astype(int))
    chosen = [usable[i] for i in pick] if usable else []
    futures = client.map(job_stain, chosen, method=method, config=config, pure=False)
    stains = [s for s in client.gather(futures) if s is not None]
    if not stains:
        raise NicError(f"--stain-target {COHORT}: no slide of the run has enough tissue to fit a {method} stain")
    return median_stain(stains)


def with_stain_target(config: CompressionConfig, method: str, target: str | None, jobs: list[SlideJob], client,
                      store: str, mpp: float | None = None) -> CompressionConfig:
    """``config`` with the run's stain settings: the method, where the target came from and its
    numbers. A cohort target already recorded in ``store`` for the same settings is reused."""
    if method == "none":
        if target is not None:
            raise NicError("--stain-target needs --stain-norm macenko or reinhard")
        return config
    if method not in METHODS:
        raise NicError(f"--stain-norm {method!r}: one of none, {', '.join(METHODS)}")
    if not target:
        raise NicError(f"--stain-norm {method} needs --stain-target: a reference slide or image, or '{COHORT}'")
    reference = COHORT if target == COHORT else str(Path(target).resolve())
    config = replace(config, stain_norm=method, stain_reference=reference)
    if reference == COHORT:
        stored = _stored_target(store, config)
        stain = Stain(method, stored) if stored else cohort_stain(client, jobs, method, config)
    else:
        stain = reference_stain(reference, method, config, mpp)
    return replace(config, stain_target=stain.values)


def _stored_target(store: str, config: CompressionConfig) -> tuple[float, ...] | None:
    """The stain target a store holds for settings equal to ``config``'s but for the target."""
    try:
        stored = zarr.open_group(str(store), mode="r", zarr_format=3, use_consolidated=False).attrs.get("compression")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return None
    if not stored or "stain_target" not in stored:
        return None
    wanted = replace(config, stain_target=tuple(stored["stain_target"])).as_attrs()
    return tuple(stored["stain_target"]) if stored == wanted else None
