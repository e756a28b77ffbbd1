"""Pictures of compressed slides: the slide thumbnail beside the PCA-RGB view of its codes.

The first three principal components of the codes, taken over tissue cells, become red, green and
blue: regions the encoder sees alike get alike colours, so a glance tells whether the compression
kept the tissue's structure (tumour, stroma, fat apart) and where it encoded. One PCA serves all
the slides of a store (the cohort), so the same code has the same colour on every slide. Drawn
through :func:`nic_pipeline.viz.figure.slide_figure`, as heatmaps are: same size, mm axes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nic_pipeline.compress.dataset import open_slide_tensor
from nic_pipeline.compress.catalog import list_slides
from nic_pipeline.compress.store import open_cohort
from nic_pipeline.viz import figure
from nic_pipeline.viz.figure import check_folders_hold_slides, slide_files_by_id
from nic_pipeline.viz.pca import PcaRgb, pca_rgb, sample_codes

__all__ = ["cohort_pca", "save_compressed_view", "save_store_views", "slide_file", "slide_files_by_id"]


def cohort_pca(store, slide_ids, cells_per_slide: int = 2000) -> PcaRgb:
    """One PCA-RGB projection for the slides of a store, fitted on a sample of each one's cells."""
    samples = []
    for i, slide_id in enumerate(slide_ids):
        ds = open_slide_tensor(store, slide_id)
        tissue = ds["tissue"].values >= ds.attrs["min_tissue"]
        samples.append(sample_codes(ds["features"].values, tissue, cells_per_slide, seed=i))
    return PcaRgb.fit(np.concatenate(samples))


def grid_extent_um(ds) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) µm of a slide's cells for imshow: each cell drawn as the square
    of one step around its centre (the store's coordinates), so overlapping patches tile too."""
    step = ds.attrs["stride"] * ds.attrs["mpp"]
    x, y = ds["x"].values, ds["y"].values
    return (x[0] - step / 2, x[-1] + step / 2, y[-1] + step / 2, y[0] - step / 2)


def save_compressed_view(store, slide_id: str, out_png: Path, slide_path: Path | None = None,
                         pca: PcaRgb | None = None) -> Path:
    """Write one PNG: thumbnail (when the slide file is given) | PCA-RGB of the compressed slide
    (through ``pca``, the cohort's, else a PCA of this slide alone)."""
    ds = open_slide_tensor(store, slide_id)
    features, tissue = ds["features"].values, ds["tissue"].values
    on_tissue = tissue >= ds.attrs["min_tissue"]
    rgb = pca.apply(features, on_tissue) if pca is not None else pca_rgb(features, on_tissue)
    encoded = int(np.any(features != 0, axis=0).sum())
    fig, (ax_slide, ax_rgb) = figure.slide_figure(
        f"{slide_id}: {features.shape[0]} x {tissue.shape[0]} x {tissue.shape[1]} tensor, "
        f"{encoded} cells encoded by {ds.attrs['encoder']}")
    extent = figure.mm(grid_extent_um(ds))
    if slide_path is not None:
        thumbnail, size_um = figure.slide_thumbnail(slide_path, ds.attrs.get("slide_mpp"))
        figure.show_thumbnail(ax_slide, thumbnail, size_um)
        ax_slide.set_title("slide", fontsize=11)
    else:
        ax_slide.imshow(on_tissue, cmap="Greys", vmin=0, vmax=4, extent=extent, interpolation="nearest")
        ax_slide.set_title("tissue cells (slide file not found: give --slides)", fontsize=11)
    ax_rgb.imshow(rgb, extent=extent, interpolation="nearest")
    ax_rgb.set_title(figure.PCA_TITLE if pca is not None else "compressed codes, PCA to RGB (this slide alone)",
                     fontsize=11)
    ax_rgb.set_xlim(ax_slide.get_xlim())
    ax_rgb.set_ylim(ax_slide.get_ylim())
    return figure.save(fig, out_png)


def slide_file(store, slide_id: str, files: dict[str, Path]) -> Path | None:
    """The slide's file: from ``files`` (``--slides``), else the source path the store recorded
    (:func:`nic_pipeline.viz.figure.slide_file`, which `nic heatmap` uses too)."""
    return figure.slide_file(slide_id, dict(open_cohort(store)[slide_id].attrs), files)


def save_store_views(store, out_dir: Path, slides=None) -> list[Path]:
    """One view PNG per complete slide of ``store``, all through one PCA (colours compare across
    slides); thumbnails from the slide files under ``slides``, else where the store says they are.
    Folders given in ``slides`` that hold none of the store's slides are an error, not ignored."""
    files = slide_files_by_id(slides)
    slide_ids = list_slides(store)
    check_folders_hold_slides(files, slide_ids, slides)
    pca = cohort_pca(store, slide_ids) if slide_ids else None
    return [
        save_compressed_view(store, slide_id, Path(out_dir) / f"{slide_id}.png", slide_file(store, slide_id, files), pca)
        for slide_id in slide_ids
    ]
