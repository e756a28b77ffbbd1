"""Macenko stain vectors and stain augmentation (known answers on generated two-stain images)."""

from __future__ import annotations

import numpy as np
import pytest

from nic_pipeline.encoder import tiles as T
from nic_pipeline.encoder.macenko import HE_REFERENCE, macenko_augment, optical_density, stain_vectors

H_TRUE = np.array([0.65, 0.70, 0.29])
E_TRUE = np.array([0.27, 0.78, 0.56])


def _two_stain_patch(seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A Beer-Lambert image of two known stains; some pixels pure H, some pure E, most mixed."""
    rng = np.random.default_rng(seed)
    he = np.stack([H_TRUE / np.linalg.norm(H_TRUE), E_TRUE / np.linalg.norm(E_TRUE)], axis=1)
    conc = rng.uniform(0.2, 1.2, (2, size * size))
    conc[1, : size * size // 10] = 0.0  # pure hematoxylin pixels
    conc[0, size * size // 10: size * size // 5] = 0.0  # pure eosin pixels
    rgb = 255.0 * np.exp(-(he @ conc).T)
    return rgb.reshape(size, size, 3) / 255.0, he


def test_stain_vectors_recover_the_two_known_stains():
    x, he = _two_stain_patch()
    found = stain_vectors(optical_density(x * 255.0), alpha=0.1)
    for k in range(2):  # H first, E second, each a unit OD vector
        cosine = found[:, k] @ he[:, k] / np.linalg.norm(found[:, k])
        assert cosine > 0.999


def test_blank_patch_falls_back_to_reference_vectors():
    blank = np.full((32, 32, 3), 250.0)
    assert np.array_equal(stain_vectors(optical_density(blank)), HE_REFERENCE)


def test_identity_draw_keeps_the_patch_and_jitter_changes_only_stain_amounts():
    x, he = _two_stain_patch(1)
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(macenko_augment(x, rng, 0.0, 0.0), x, atol=1e-6)
    y = macenko_augment(x, np.random.default_rng(3), 0.3, 0.1)
    assert y.shape == x.shape and y.dtype == np.float32 and not np.allclose(y, x, atol=1e-3)
    # the change in OD lies in the span of the two stain vectors (no new colours appear)
    delta = optical_density(np.clip(y, 1e-3, 1) * 255.0) - optical_density(x * 255.0)
    residual = delta - delta @ he @ np.linalg.pinv(he)
    assert np.abs(residual).max() < 0.02
    assert np.array_equal(y, macenko_augment(x, np.random.default_rng(3), 0.3, 0.1))  # seeded


def test_augment_patch_uses_macenko_when_asked():
    x, _ = _two_stain_patch(2, size=128)
    patch = (x * 255).astype(np.uint8)
    off = dict(hed_sigma=0, brightness=0, contrast=0, blur_p=0, use_dihedral=False)
    assert np.array_equal(T.augment_patch(patch, np.random.default_rng(0), **off), patch)
    jittered = T.augment_patch(patch, np.random.default_rng(0), macenko_scale=0.2, macenko_shift=0.2, **off)
    assert np.abs(jittered.astype(int) - patch).mean() > 1.0
    assert jittered.dtype == np.uint8


@pytest.mark.parametrize("seed", [0, 1])
def test_real_pcam_patch_stays_plausible(seed):
    from tests.conftest import shared_path

    path = next(iter(sorted(shared_path("pcam", "train", "1").glob("*.jpg"))))
    patch = T.read_rgb(path)
    he = stain_vectors(optical_density(patch))
    assert he[0, 0] > he[0, 1]  # H absorbs red more than E does
    out = macenko_augment(patch / 255.0, np.random.default_rng(seed), 0.2, 0.2)
    assert abs(out.mean() - patch.mean() / 255.0) < 0.15  # a stain jitter, not a new image
