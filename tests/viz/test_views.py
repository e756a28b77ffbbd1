"""Views of a compressed store: one PNG per slide, all through one PCA."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.viz.pca import PcaRgb
from pipeline.viz.views import cohort_pca, save_store_views
from tests.classify.cohort import make_cohort


def test_store_views_share_one_pca(tmp_path):
    store, _, _ = make_cohort(tmp_path, n_slides=3, grid=12, channels=4, lesion_size=3)
    pca = cohort_pca(store, ["slide-000", "slide-001", "slide-002"])
    assert isinstance(pca, PcaRgb) and np.asarray(pca.components).shape == (4, 3)
    paths = save_store_views(store, tmp_path / "views")
    assert sorted(p.name for p in paths) == ["slide-000.png", "slide-001.png", "slide-002.png"]
    assert Image.open(paths[0]).size[0] > 0
