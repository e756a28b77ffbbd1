"""Heatmap figures: a slide's relevance map over its thumbnail, beside the PCA-RGB view.

Made to be read by a pathologist: one colour scale for the whole cohort (:class:`HeatScale`, so
a negative slide looks quiet next to a positive one), a perceptual colour map (viridis; a
diverging map centred on 0 when relevance is signed) whose colour bar reads in **cohort
percentiles** (a cell at the 99th percentile scores higher than 99 % of the cohort's tissue cells;
the model's raw unit, such as attention × cell logit, stays in the CSV/JSON/npy outputs), an
overlay whose opacity grows with relevance (low-relevance tissue stays as it is, not darkened),
millimetre axes, the score named as what it is (and whether it is in-sample) next to the true
label, and the figure of :mod:`nic_pipeline.viz.figure` (2400 x 1200 px, like `nic view`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from nic_pipeline.viz import figure

SEQUENTIAL, DIVERGING = "viridis", "coolwarm"
MAX_ALPHA = 0.8
LESION_COLOUR = "#00e5ff"
PERCENTILE_GRID = np.linspace(0.0, 100.0, 1001)  # the cohort's relevance at every 0.1 percentile
COLOURBAR_PERCENTILES = (1, 10, 50, 75, 90, 95, 99, 99.9)


@dataclass(frozen=True)
class HeatScale:
    """One colour scale for all the heatmaps of a cohort, and the cohort's distribution of
    relevance (``reference``: the raw value at each percentile of :data:`PERCENTILE_GRID`) that
    turns a raw value into a cohort percentile."""

    vmin: float
    vmax: float
    cmap: str
    reference: tuple[float, ...] = field(default=(), repr=False)

    @classmethod
    def from_values(cls, values, percentile: float = 99.0) -> "HeatScale":
        """Scale from relevance values of the whole cohort (a sample is enough): 0 to the 99th
        percentile, or symmetric around 0 with a diverging map when values are clearly signed."""
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return cls(0.0, 1.0, SEQUENTIAL)
        reference = tuple(float(v) for v in np.percentile(values, PERCENTILE_GRID))
        top = float(np.percentile(np.abs(values), percentile)) or 1.0
        if np.percentile(values, 100 - percentile) < -0.05 * top:
            return cls(-top, top, DIVERGING, reference)
        return cls(min(0.0, float(values.min())), float(np.percentile(values, percentile)) or 1.0, SEQUENTIAL,
                   reference)

    @property
    def signed(self) -> bool:
        return self.cmap == DIVERGING

    def normalize(self) -> Normalize:
        return Normalize(self.vmin, self.vmax, clip=True)

    def percentile(self, values):
        """Cohort percentile (0-100) of raw relevance values: the share of the cohort's tissue
        cells that score lower (ties share the middle); NaN stays NaN."""
        values = np.asarray(values, dtype=np.float64)
        if not self.reference:
            return np.full(values.shape, np.nan)
        ref = np.asarray(self.reference)
        finite = np.where(np.isfinite(values), values, ref[0])
        left = np.searchsorted(ref, finite, side="left")
        right = np.searchsorted(ref, finite, side="right")
        n = len(ref)
        below, above = np.clip(left - 1, 0, n - 1), np.clip(left, 0, n - 1)
        gap = ref[above] - ref[below]
        t = np.where(gap > 0, (finite - ref[below]) / np.where(gap > 0, gap, 1.0), 0.0)
        between = PERCENTILE_GRID[below] + t * (PERCENTILE_GRID[above] - PERCENTILE_GRID[below])
        tied = (PERCENTILE_GRID[np.clip(left, 0, n - 1)] + PERCENTILE_GRID[np.clip(right - 1, 0, n - 1)]) / 2
        out = np.where(right > left, tied, np.where(left == 0, 0.0, np.where(left == n, 100.0, between)))
        return np.where(np.isfinite(values), out, np.nan)

    def raw_at(self, percentiles) -> np.ndarray:
        """Raw relevance at cohort percentiles (the inverse of :meth:`percentile`)."""
        return np.interp(percentiles, PERCENTILE_GRID, np.asarray(self.reference))

    def overlay(self, heat: np.ndarray) -> np.ndarray:
        """RGBA (ny, nx, 4) float: colour by value, opacity by strength (NaN transparent)."""
        level = self.normalize()(np.ma.masked_invalid(heat)).filled(np.nan)
        rgba = plt.get_cmap(self.cmap)(np.nan_to_num(level))
        strength = np.abs(2 * level - 1) if self.signed else level
        rgba[..., 3] = np.where(np.isfinite(level), MAX_ALPHA * np.clip(strength, 0, 1), 0.0)
        return rgba

    def as_dict(self) -> dict:
        """JSON-ready: the colour scale in raw units, and the raw value at each 0.1 percentile."""
        return {"vmin": self.vmin, "vmax": self.vmax, "cmap": self.cmap, "reference": list(self.reference)}

    def summary(self) -> dict:
        """The raw relevance at a few cohort percentiles, for people (heatmaps.json)."""
        if not self.reference:
            return {}
        return {f"p{p:g}": float(self.raw_at(p)) for p in COLOURBAR_PERCENTILES}


def colour_bar(fig, ax, scale: HeatScale, raw_label: str):
    """The colour bar beside ``ax``: ticks at cohort percentiles (what a reader can use), the
    model's raw unit named below it."""
    bar = fig.colorbar(ScalarMappable(scale.normalize(), scale.cmap), ax=ax, fraction=0.04, pad=0.02)
    if scale.reference:
        ticks, labels = [], []
        span = scale.vmax - scale.vmin
        for p in COLOURBAR_PERCENTILES:
            raw = float(scale.raw_at(p))
            if scale.vmin <= raw <= scale.vmax and all(abs(raw - t) > 0.04 * span for t in ticks):
                ticks.append(raw)
                labels.append(f"{p:g}")
        bar.set_ticks(ticks, labels=labels)
        bar.set_label(f"cohort percentile of tissue cells (one scale for the cohort)\nraw unit: {raw_label}",
                      fontsize=9)
    else:
        bar.set_label(f"{raw_label} (one scale for the cohort)")
    return bar


def heatmap_figure(heat, rgb, extent, scale: HeatScale, *, thumbnail=None, thumbnail_extent=None, tissue=None,
                   lesion=None, lesion_xy=None, title: str = "", relevance_label: str = "relevance"):
    """The figure: relevance over the thumbnail (else over the tissue in grey) with its colour
    bar | PCA-RGB of the codes. ``extent`` (left, right, bottom, top) in µm places the grid;
    ``thumbnail_extent`` (height, width) µm the thumbnail; ``lesion`` fractions are outlined at
    0.5 at cell centres ``lesion_xy`` (x, y) µm."""
    mm = figure.mm(extent)
    fig, (ax, ax_rgb) = figure.slide_figure(title)
    if thumbnail is not None and thumbnail_extent is not None:
        figure.show_thumbnail(ax, thumbnail, thumbnail_extent)
    elif tissue is not None:
        ax.imshow(tissue, cmap="Greys", vmin=0, vmax=4, extent=mm, interpolation="nearest")
    ax.imshow(scale.overlay(heat), extent=mm, interpolation="nearest")
    outlined = lesion is not None and lesion.max() >= 0.5
    if outlined:
        ax.contour(np.asarray(lesion_xy[0]) / 1000, np.asarray(lesion_xy[1]) / 1000, lesion, levels=[0.5],
                   colors=LESION_COLOUR, linewidths=1.5)
    ax.set_xlim(mm[0], mm[1])
    ax.set_ylim(mm[2], mm[3])
    colour_bar(fig, ax, scale, relevance_label)
    ax.set_title("relevance" + (" — lesion outlined in cyan" if outlined else ""), fontsize=11)
    ax_rgb.imshow(rgb, extent=mm, interpolation="nearest")
    ax_rgb.set_xlim(mm[0], mm[1])
    ax_rgb.set_ylim(mm[2], mm[3])
    ax_rgb.set_title(figure.PCA_TITLE, fontsize=11)
    return fig


def render(path, heat, rgb, extent, scale: HeatScale, **kwargs) -> None:
    """Write :func:`heatmap_figure` as a PNG."""
    figure.save(heatmap_figure(heat, rgb, extent, scale, **kwargs), path)
