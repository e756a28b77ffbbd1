"""Heatmap figures a pathologist can read: one perceptual colour scale with a colour bar, an
overlay that leaves low-relevance tissue as it is, and a large PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image

from nic_pipeline.viz.heatmap import DIVERGING, SEQUENTIAL, HeatScale, heatmap_figure, render


def test_scale_is_perceptual_and_signed_only_when_values_are():
    values = np.random.default_rng(0).gamma(2.0, size=1000)
    scale = HeatScale.from_values(values)
    assert scale.cmap == SEQUENTIAL == "viridis" and scale.vmin == 0.0
    assert scale.vmax == np.percentile(values, 99)
    signed = HeatScale.from_values(values - 2.0)
    assert signed.cmap == DIVERGING and signed.vmin == -signed.vmax


def test_overlay_leaves_low_relevance_tissue_untouched():
    scale = HeatScale(0.0, 10.0, SEQUENTIAL)
    heat = np.array([[0.0, 5.0], [10.0, np.nan]])
    alpha = scale.overlay(heat)[..., 3]
    assert alpha[0, 0] == 0.0 and alpha[1, 1] == 0.0  # nothing drawn over quiet or empty cells
    assert 0.3 < alpha[0, 1] < alpha[1, 0] <= 0.8
    signed = HeatScale(-10.0, 10.0, DIVERGING).overlay(np.array([[0.0, -10.0, 10.0]]))[..., 3]
    assert signed[0, 0] == 0.0 and signed[0, 1] == signed[0, 2] > 0.5


def test_figure_has_a_colour_bar_and_a_readable_resolution(tmp_path):
    heat = np.random.default_rng(1).random((20, 30))
    heat[:3] = np.nan
    rgb = np.full((20, 30, 3), 200, np.uint8)
    extent = (0.0, 3000.0, 2000.0, 0.0)
    fig = heatmap_figure(heat, rgb, extent, HeatScale(0.0, 1.0, SEQUENTIAL), tissue=np.ones((20, 30)),
                         title="s1: P(tumor) = 0.9 · true label: tumor")
    colourbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colourbars) == 1 and "one scale for the cohort" in colourbars[0].get_ylabel()
    cmaps = {im.get_cmap().name for ax in fig.axes for im in ax.get_images()}
    assert "jet" not in cmaps and "viridis" in cmaps
    render(tmp_path / "h.png", heat, rgb, extent, HeatScale(0.0, 1.0, SEQUENTIAL))
    assert Image.open(tmp_path / "h.png").size[0] >= 2000
