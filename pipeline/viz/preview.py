"""`nic preview`: what `nic compress` will encode, drawn before a long run.

For each slide: the thumbnail with the tissue mask's outline (left) and with the patch grid, the
cells whose patch holds enough tissue to be encoded shaded (right). The mask, the grid and the
per-cell tissue fractions come from the functions `nic compress` runs in its ``detect_tissue``
task (:func:`~nic_pipeline.compress.tissue.slide_tissue_mask`, :class:`~nic_pipeline.compress.grid.Grid`,
:func:`~nic_pipeline.compress.grid.cell_coverage`, the µm/px rule of
:func:`~nic_pipeline.compress.jobs.slide_mpp`), with the same defaults, so the picture shows what
the run will do. Drawn through :func:`nic_pipeline.viz.figure.slide_figure` like views and heatmaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nic_models.registry import get_spec
from nic_pipeline.compress.grid import DEFAULT_MIN_TISSUE, Grid, cell_coverage
from nic_pipeline.compress.jobs import SlideJob, plan_jobs, slide_mpp
from nic_pipeline.compress.tissue import DEFAULT_MASK_MPP, slide_tissue_mask
from nic_pipeline.errors import NicError
from nic_pipeline.io import open_slide
from nic_pipeline.viz import figure

MASK_COLOUR, CELL_COLOUR = "#00e5ff", (0.1, 0.8, 0.2)
MAX_GRID_LINES = 160  # cells per side up to which every cell's edge is drawn (else only the shading)


@dataclass(frozen=True)
class Preview:
    """What `nic compress` would do with one slide."""

    slide_id: str
    png: Path
    grid_shape: tuple[int, int]
    cells_to_encode: int
    mpp: float
    mpp_source: str


def slide_plan(job: SlideJob, encoder: str = "nic", stride: int | None = None,
               mask_mpp: float = DEFAULT_MASK_MPP):
    """(grid, tissue fraction per cell, mask, mask µm/px, slide µm/px and its source, thumbnail)
    of one slide, through the functions `nic compress` runs."""
    spec = get_spec(encoder)
    with open_slide(job.path) as slide:
        mpp, mpp_source = slide_mpp(slide.mpp, job)
        grid = Grid(*slide.dimensions, mpp, spec.mpp, spec.patch_size, stride or spec.stride)
        if 0 in grid.shape:
            raise NicError(f"{job.path}: smaller than one {spec.patch_size} px patch at {spec.mpp} µm/px")
        slide.mpp = mpp
        mask, mask_mpp = slide_tissue_mask(slide, mask_mpp=mask_mpp, require_tissue=False)
        tissue = np.asarray(cell_coverage(mask, mask_mpp, grid.cell_um, grid.shape, grid.patch_um))
        thumbnail = slide.thumbnail(figure.THUMBNAIL_PX)
    return grid, tissue, mask, mask_mpp, (mpp, mpp_source), thumbnail


def preview_slide(job: SlideJob, out_png, encoder: str = "nic", stride: int | None = None,
                  min_tissue: float = DEFAULT_MIN_TISSUE, mask_mpp: float = DEFAULT_MASK_MPP) -> Preview:
    """Draw one slide's preview PNG; returns what it shows."""
    grid, tissue, mask, mask_mpp, (mpp, mpp_source), thumbnail = slide_plan(job, encoder, stride, mask_mpp)
    encoded = tissue >= min_tissue
    ny, nx = grid.shape
    size_um = (grid.height * mpp, grid.width * mpp)
    title = (f"{job.slide_id}: {int(encoded.sum())} of {ny * nx} cells to encode ({grid.patch_size} px patches at "
             f"{grid.mpp:g} µm/px every {grid.stride} px; tissue ≥ {min_tissue:.0%} of a patch) · "
             f"slide {mpp:g} µm/px ({mpp_source})")
    fig, (ax_mask, ax_grid) = figure.slide_figure(title)
    for ax in (ax_mask, ax_grid):
        figure.show_thumbnail(ax, thumbnail, size_um)
    if mask.any():  # mask pixel (i, j) covers [j, j+1) x [i, i+1) * mask_mpp µm
        ys, xs = ((np.arange(n) + 0.5) * mask_mpp / 1000 for n in mask.shape)
        ax_mask.contour(xs, ys, mask.astype(np.float32), levels=[0.5], colors=MASK_COLOUR, linewidths=1.2)
    ax_mask.set_title(f"tissue mask outline (detected at {mask_mpp:g} µm/px)", fontsize=11)
    cells_mm = (0, nx * grid.cell_um / 1000, ny * grid.cell_um / 1000, 0)
    shade = np.zeros((ny, nx, 4), np.float32)
    shade[encoded] = (*CELL_COLOUR, 0.35)
    ax_grid.imshow(shade, extent=cells_mm, interpolation="nearest")
    if max(ny, nx) <= MAX_GRID_LINES:
        edges_x, edges_y = np.arange(nx + 1) * grid.cell_um / 1000, np.arange(ny + 1) * grid.cell_um / 1000
        ax_grid.vlines(edges_x, 0, edges_y[-1], colors="black", linewidths=0.3, alpha=0.5)
        ax_grid.hlines(edges_y, 0, edges_x[-1], colors="black", linewidths=0.3, alpha=0.5)
    ax_grid.set_title(f"patch grid {ny} x {nx} cells of {grid.cell_um:g} µm; green: encoded", fontsize=11)
    for ax in (ax_mask, ax_grid):
        ax.set_xlim(0, size_um[1] / 1000)
        ax.set_ylim(size_um[0] / 1000, 0)
    png = figure.save(fig, out_png)
    return Preview(job.slide_id, png, (ny, nx), int(encoded.sum()), mpp, mpp_source)


def preview_slides(paths, out_dir, mpp: float | None = None, force_mpp: bool = False, **options):
    """Preview PNGs for the slides under ``paths`` (files, folders, CSV lists, as `nic compress`
    takes them): ``out_dir/<slide_id>.png``. Returns (previews, [(path, reason)] of slides that failed)."""
    previews, failed = [], []
    for job in plan_jobs(paths, mpp=mpp, force_mpp=force_mpp):
        if job.problem:
            failed.append((job.path, job.problem))
            continue
        try:
            previews.append(preview_slide(job, Path(out_dir) / f"{job.slide_id}.png", **options))
        except NicError as err:  # SlideError is one: a bad slide is reported, the rest goes on
            failed.append((job.path, str(err)))
    return previews, failed
