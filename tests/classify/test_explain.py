"""Lesion masks on the grid and the heatmap AUC."""

from __future__ import annotations

import numpy as np

from pipeline.classify.explain import heatmap_auc, mask_to_grid


def test_lesion_mask_to_grid_fractions():
    meta = {"shape": (4, 4, 6), "attrs": {}, "y": (np.arange(4) + 0.5) * 64.0, "x": (np.arange(6) + 0.5) * 64.0}
    mask = np.zeros((16, 24), bool)  # 16 µm per mask px: 4 px per 64 µm cell
    mask[4:8, 8:16] = True  # cells (1, 2) and (1, 3)
    mask[8:10, 0:4] = True  # half of cell (2, 0)
    grid = mask_to_grid(mask, meta, (16.0, 16.0))
    expected = np.zeros((4, 6))
    expected[1, 2:4] = 1
    expected[2, 0] = 0.5
    np.testing.assert_allclose(grid, expected)
    heat = np.where(expected >= 0.5, 2.0, 0.0)  # cells at least half lesion count as lesion
    heat[0, 0] = np.nan  # off tissue: ignored
    assert heatmap_auc(heat, grid) == 1.0
