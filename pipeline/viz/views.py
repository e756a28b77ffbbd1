"""Pictures of compressed slides: the slide thumbnail beside the PCA-RGB view of its codes.

The first three principal components of the codes, taken over tissue cells, become red, green and
blue: regions the encoder sees alike get alike colours, so a glance tells whether the compression
kept the tissue's structure (tumour, stroma, fat apart) and where it encoded. One PCA serves all
the slides of a store, so the same code has the same colour on every slide.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
import numpy as np  # noqa: E402

from nic_pipeline.compress.dataset import open_slide_tensor  # noqa: E402
from nic_pipeline.compress.store import list_slides, open_cohort  # noqa: E402
from nic_pipeline.errors import NicError  # noqa: E402
from nic_pipeline.io import find_slides, open_slide  # noqa: E402
from nic_pipeline.viz.pca import PcaRgb, pca_rgb, sample_codes  # noqa: E402


def slide_files_by_id(folders) -> dict[str, Path]:
    """Slide files under ``folders`` by slide id (file name without extension)."""
    return {path.stem: path for path in find_slides(folders)} if folders else {}


def cohort_pca(store, slide_ids, cells_per_slide: int = 2000) -> PcaRgb:
    """One PCA-RGB projection for the slides of a store, fitted on a sample of each one's cells."""
    samples = []
    for i, slide_id in enumerate(slide_ids):
        ds = open_slide_tensor(store, slide_id)
        tissue = ds["tissue"].values >= ds.attrs["min_tissue"]
        samples.append(sample_codes(ds["features"].values, tissue, cells_per_slide, seed=i))
    return PcaRgb.fit(np.concatenate(samples))


def save_compressed_view(store, slide_id: str, out_png: Path, slide_path: Path | None = None,
                         pca: PcaRgb | None = None) -> Path:
    """Write one PNG: thumbnail (when the slide file is given) | PCA-RGB of the compressed slide
    (through ``pca``, else a PCA of this slide alone)."""
    ds = open_slide_tensor(store, slide_id)
    features, tissue = ds["features"].values, ds["tissue"].values
    on_tissue = tissue >= ds.attrs["min_tissue"]
    rgb = pca.apply(features, on_tissue) if pca is not None else pca_rgb(features, on_tissue)
    cell = ds.attrs["stride"] * ds.attrs["mpp"]
    extent = (0, tissue.shape[1] * cell, tissue.shape[0] * cell, 0)  # µm, image convention
    panels = [("compressed: PCA of the codes to RGB" + (" (one PCA for the store)" if pca else ""), rgb, extent)]
    if slide_path is not None:
        with open_slide(slide_path, mpp=ds.attrs["slide_mpp"]) as slide:
            width, height = slide.dimensions
            thumb = slide.thumbnail(1024)
        panels.insert(0, ("slide", thumb, (0, width * ds.attrs["slide_mpp"], height * ds.attrs["slide_mpp"], 0)))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), dpi=100, squeeze=False)
    for ax, (title, image, ext) in zip(axes[0], panels):
        ax.imshow(image, extent=ext, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("µm")
    encoded = int(np.any(features != 0, axis=0).sum())
    fig.suptitle(f"{slide_id}: {features.shape[0]} x {tissue.shape[0]} x {tissue.shape[1]} tensor, "
                 f"{encoded} cells encoded by {ds.attrs['encoder']}", fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def slide_file(store, slide_id: str, files: dict[str, Path]) -> Path | None:
    """The slide's file: from ``files`` (``--slides``), else the source path the store recorded,
    when it still exists; None (no thumbnail) otherwise."""
    if slide_id in files:
        return files[slide_id]
    recorded = open_cohort(store)[slide_id].attrs.get("source_path")
    return Path(recorded) if recorded and Path(recorded).is_file() else None


def save_store_views(store, out_dir: Path, slides=None) -> list[Path]:
    """One view PNG per complete slide of ``store``, all through one PCA (colours compare across
    slides); thumbnails from the slide files under ``slides``, else where the store says they are.
    Folders given in ``slides`` that hold none of the store's slides are an error, not ignored."""
    files = slide_files_by_id(slides)
    slide_ids = list_slides(store)
    if slides and not set(files) & set(slide_ids):
        raise NicError(f"no slide of {store} is under {', '.join(map(str, slides))} (--slides); "
                       "leave it out to use the paths the store recorded")
    pca = cohort_pca(store, slide_ids) if slide_ids else None
    return [
        save_compressed_view(store, slide_id, Path(out_dir) / f"{slide_id}.png", slide_file(store, slide_id, files), pca)
        for slide_id in slide_ids
    ]
