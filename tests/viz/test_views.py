"""Views of a compressed store: one PNG per slide, all through one PCA."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from nic_pipeline.errors import NicError
from nic_pipeline.synth import write_synthetic_slide
from nic_pipeline.viz.pca import PcaRgb
from nic_pipeline.viz.views import cohort_pca, save_store_views, slide_file
from tests.classify.cohort import make_cohort


@pytest.mark.slow
def test_store_views_share_one_pca(tmp_path):
    store, _, _ = make_cohort(tmp_path, n_slides=3, grid=12, channels=4, lesion_size=3)
    pca = cohort_pca(store, ["slide-000", "slide-001", "slide-002"])
    assert isinstance(pca, PcaRgb) and np.asarray(pca.components).shape == (4, 3)
    paths = save_store_views(store, tmp_path / "views")
    assert sorted(p.name for p in paths) == ["slide-000.png", "slide-001.png", "slide-002.png"]
    assert Image.open(paths[0]).size == (2400, 1200)  # the figure heatmaps use (pipeline/viz/figure.py)



def test_thumbnails_come_from_the_recorded_source_and_a_wrong_slides_folder_is_an_error(tmp_path):
    """`nic view` finds the slide files where the store recorded them; a --slides folder holding
    none of the store's slides is refused instead of silently ignored."""
    store, _, _ = make_cohort(tmp_path, n_slides=1, grid=12, channels=4, lesion_size=3)
    slide = write_synthetic_slide(tmp_path / "slide-000.tif", 1536, 1536, mpp=0.5, seed=1).path
    zarr.open_group(str(store), path="slide-000", mode="r+").attrs["source_path"] = str(slide)
    assert slide_file(store, "slide-000", {}) == slide
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "other.tif").write_bytes(b"")
    with pytest.raises(NicError, match="none of the store.s slides is under"):
        save_store_views(store, tmp_path / "views", [tmp_path / "elsewhere"])
