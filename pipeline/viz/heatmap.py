"""Heatmap figures: a slide's relevance map over its thumbnail, beside the PCA-RGB view.

Made to be read by a pathologist: one colour scale for the whole cohort (:class:`HeatScale`, so
a negative slide looks quiet next to a positive one), a perceptual colour map (viridis; a
diverging map centred on 0 when relevance is signed) with a colour bar, an overlay whose opacity
grows with relevance (low-relevance tissue stays as it is, not darkened), millimetre axes, the
score named as what it is next to the true label, and 2400 px wide PNGs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

SEQUENTIAL, DIVERGING = "viridis", "coolwarm"
MAX_ALPHA = 0.8
LESION_COLOUR = "#00e5ff"
FIGSIZE, DPI = (16, 8), 150


@dataclass(frozen=True)
class HeatScale:
    """One colour scale for all the heatmaps of a cohort."""

    vmin: float
    vmax: float
    cmap: str

    @classmethod
    def from_values(cls, values, percentile: float = 99.0) -> "HeatScale":
        """Scale from relevance values of the whole cohort (a sample is enough): 0 to the 99th
        percentile, or symmetric around 0 with a diverging map when values are clearly signed."""
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return cls(0.0, 1.0, SEQUENTIAL)
        top = float(np.percentile(np.abs(values), percentile)) or 1.0
        if np.percentile(values, 100 - percentile) < -0.05 * top:
            return cls(-top, top, DIVERGING)
        return cls(min(0.0, float(values.min())), float(np.percentile(values, percentile)) or 1.0, SEQUENTIAL)

    @property
    def signed(self) -> bool:
        return self.cmap == DIVERGING

    def normalize(self) -> Normalize:
        return Normalize(self.vmin, self.vmax, clip=True)

    def overlay(self, heat: np.ndarray) -> np.ndarray:
        """RGBA (ny, nx, 4) float: colour by value, opacity by strength (NaN transparent)."""
        level = self.normalize()(np.ma.masked_invalid(heat)).filled(np.nan)
        rgba = plt.get_cmap(self.cmap)(np.nan_to_num(level))
        strength = np.abs(2 * level - 1) if self.signed else level
        rgba[..., 3] = np.where(np.isfinite(level), MAX_ALPHA * np.clip(strength, 0, 1), 0.0)
        return rgba

    def as_dict(self) -> dict:
        return asdict(self)


def heatmap_figure(heat, rgb, extent, scale: HeatScale, *, thumbnail=None, thumbnail_extent=None, tissue=None,
                   lesion=None, lesion_xy=None, title: str = "", relevance_label: str = "relevance"):
    """The figure: relevance over the thumbnail (else over the tissue in grey) with its colour
    bar | PCA-RGB of the codes. ``extent`` (left, right, bottom, top) in µm places the grid;
    ``thumbnail_extent`` (height, width) µm the thumbnail; ``lesion`` fractions are outlined at
    0.5 at cell centres ``lesion_xy`` (x, y) µm."""
    mm = tuple(v / 1000 for v in extent)
    fig, (ax, ax_rgb) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI, layout="constrained")
    if thumbnail is not None and thumbnail_extent is not None:
        ax.imshow(thumbnail, extent=(0, thumbnail_extent[1] / 1000, thumbnail_extent[0] / 1000, 0))
    elif tissue is not None:
        ax.imshow(tissue, cmap="Greys", vmin=0, vmax=4, extent=mm, interpolation="nearest")
    ax.imshow(scale.overlay(heat), extent=mm, interpolation="nearest")
    outlined = lesion is not None and lesion.max() >= 0.5
    if outlined:
        ax.contour(np.asarray(lesion_xy[0]) / 1000, np.asarray(lesion_xy[1]) / 1000, lesion, levels=[0.5],
                   colors=LESION_COLOUR, linewidths=1.5)
    ax.set_xlim(mm[0], mm[1])
    ax.set_ylim(mm[2], mm[3])
    fig.colorbar(ScalarMappable(scale.normalize(), scale.cmap), ax=ax, fraction=0.04, pad=0.02,
                 label=f"{relevance_label} (one scale for the cohort)")
    ax.set_title("relevance" + (" — lesion outlined in cyan" if outlined else ""), fontsize=11)
    ax_rgb.imshow(rgb, extent=mm, interpolation="nearest")
    ax_rgb.set_title("compressed codes, PCA to RGB (one PCA for the cohort)", fontsize=11)
    for axis in (ax, ax_rgb):
        axis.set_xlabel("mm")
        axis.set_ylabel("mm")
    fig.suptitle(title, fontsize=13)
    return fig


def render(path, heat, rgb, extent, scale: HeatScale, **kwargs) -> None:
    """Write :func:`heatmap_figure` as a PNG."""
    fig = heatmap_figure(heat, rgb, extent, scale, **kwargs)
    fig.savefig(path)
    plt.close(fig)
