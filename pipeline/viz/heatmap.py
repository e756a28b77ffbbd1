"""Heatmap figures: a slide's relevance map over its thumbnail, beside the PCA-RGB view."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
import numpy as np  # noqa: E402


def render(path, heat, rgb, extent, thumbnail=None, extent_um=None, lesion=None, lesion_xy=None, title=""):
    """Write the PNG: relevance over the thumbnail (or alone) | PCA-RGB of the codes.

    ``extent`` (left, right, bottom, top) in µm places the grid; ``extent_um`` (height, width) the
    thumbnail; ``lesion`` (ny, nx) fractions are outlined at 0.5 at cell centres ``lesion_xy``.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=100)
    ax = axes[0]
    if thumbnail is not None and extent_um is not None:
        ax.imshow(thumbnail, extent=(0, extent_um[1], extent_um[0], 0))
        ax.imshow(np.ma.masked_invalid(heat), cmap="jet", alpha=0.45, extent=extent, interpolation="nearest")
    else:
        ax.imshow(np.ma.masked_invalid(heat), cmap="jet", extent=extent, interpolation="nearest")
    if lesion is not None and lesion.max() >= 0.5:
        ax.contour(lesion_xy[0], lesion_xy[1], lesion, levels=[0.5], colors="white", linewidths=1)
    ax.set_title("relevance" + (" (lesion outlined)" if lesion is not None else ""), fontsize=9)
    axes[1].imshow(rgb, extent=extent, interpolation="nearest")
    axes[1].set_title("compressed tensor, PCA to RGB", fontsize=9)
    for ax in axes:
        ax.set_xlabel("µm")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
