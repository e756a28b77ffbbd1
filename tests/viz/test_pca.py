"""PCA-RGB views of compressed tensors."""

from __future__ import annotations

import numpy as np

from nic_pipeline.viz.pca import PcaRgb, pca_rgb, sample_codes


def test_pca_rgb_separates_code_populations_on_white_background():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(16, 20, 20)).astype(np.float16)
    feats[:, 5:10, 5:10] += 4  # a second population of codes
    tissue = np.ones((20, 20), np.float32)
    tissue[:, :3] = 0
    feats[:, :, :3] = 0
    rgb = pca_rgb(feats, tissue)
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    assert np.all(rgb[:, :3] == 255)
    inside, outside = rgb[5:10, 5:10].reshape(-1, 3).astype(float), rgb[12:, 12:].reshape(-1, 3).astype(float)
    assert np.abs(inside.mean(0) - outside.mean(0)).max() > 100  # the first component splits them
    np.testing.assert_array_equal(pca_rgb(feats, tissue), rgb)  # deterministic colours
    assert np.all(pca_rgb(feats[:2], tissue, background="black")[:, :3] == 0)  # fewer than 3 codes


def test_one_pca_per_cohort_gives_the_same_colour_to_the_same_code():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8, 10, 10))
    b = rng.normal(size=(8, 10, 10)) * np.linspace(0.2, 3, 8)[:, None, None]  # another mix of codes
    b[:, 0, 0] = a[:, 0, 0]  # one cell holds the same code in both slides
    tissue = np.ones((10, 10))
    pca = PcaRgb.fit(np.concatenate([sample_codes(a, tissue, 50, seed=0), sample_codes(b, tissue, 50, seed=1)]))
    np.testing.assert_array_equal(pca.apply(a, tissue)[0, 0], pca.apply(b, tissue)[0, 0])
    assert np.abs(pca_rgb(a, tissue)[0, 0].astype(int) - pca_rgb(b, tissue)[0, 0]).max() > 20  # per-slide PCA
    assert len(sample_codes(a, tissue, 50)) == 50 and len(sample_codes(a, tissue, 500)) == 100
