"""Stain normalisation methods: known stain vectors recovered, Lab statistics matched, restained
copies brought back, images without enough tissue left as they are, and CuPy equal to NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from nic_pipeline.compress.stain import (
    METHODS,
    Stain,
    fit_stain,
    macenko_matrix,
    median_stain,
    normalise,
    normaliser,
)
from nic_pipeline.compress.tissue import optical_density
from nic_pipeline.io import open_slide
from nic_pipeline.synth import write_synthetic_slide
from nic_pipeline.synth.stain import EOSIN, HEMATOXYLIN


def unit(v):
    return np.asarray(v, np.float64) / np.linalg.norm(v)


def beer_lambert(stains: np.ndarray, side: int = 200, seed: int = 0):
    """A uint8 image of two stains with known OD vectors (rows of ``stains``): a third of the
    pixels pure H, a third pure E, a third mixed; returns the image and the true concentrations."""
    rng = np.random.default_rng(seed)
    n = side * side
    conc = rng.uniform(0.2, 1.5, (n, 2)) * rng.uniform(0.5, 1.5, 2)
    kind = rng.integers(0, 3, n)
    conc[kind == 0, 1] = 0
    conc[kind == 1, 0] = 0
    od = conc @ stains
    rgb = np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)
    return rgb.reshape(side, side, 3), conc


STAINS = {
    "standard": np.stack([unit(HEMATOXYLIN), unit(EOSIN)]),
    "lab B": np.stack([unit(HEMATOXYLIN * [0.8, 1.2, 1.1]), unit(EOSIN * [1.2, 0.9, 1.25])]),
}


@pytest.mark.parametrize("name", STAINS)
def test_macenko_recovers_known_stain_vectors_and_concentrations(name):
    truth = STAINS[name]
    rgb, conc = beer_lambert(truth)
    stain = fit_stain("macenko", rgb)
    cosines = (stain.stains * truth).sum(axis=1)
    assert cosines.min() > 0.999, cosines  # H first, E second, both within ~2.5 degrees
    np.testing.assert_allclose(stain.max_conc, np.percentile(conc, 99, axis=0), rtol=0.03)


def test_macenko_maps_one_known_stain_onto_another():
    rgb, conc = beer_lambert(STAINS["lab B"])
    source, target = fit_stain("macenko", rgb), fit_stain("macenko", beer_lambert(STAINS["standard"], seed=1)[0])
    # the OD map sends the source's H and E vectors onto the target's, scaled by the max concentrations
    mapped = source.stains @ macenko_matrix(source, target)
    np.testing.assert_allclose(mapped, target.stains * (target.max_conc / source.max_conc)[:, None], atol=1e-6)
    out = normalise(rgb, source, target)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    refit = fit_stain("macenko", out)
    assert (refit.stains * target.stains).sum(axis=1).min() > 0.999
    np.testing.assert_allclose(refit.max_conc, target.max_conc, rtol=0.03)


def test_reinhard_maps_lab_mean_and_std_onto_the_target():
    source_rgb = beer_lambert(STAINS["lab B"])[0]
    target_rgb = beer_lambert(STAINS["standard"], seed=1)[0]
    source, target = fit_stain("reinhard", source_rgb), fit_stain("reinhard", target_rgb)
    assert np.abs(source.lab_mean - target.lab_mean).max() > 5  # the two stains differ to start with
    moved = fit_stain("reinhard", normalise(source_rgb, source, target))
    np.testing.assert_allclose(moved.lab_mean, target.lab_mean, atol=1.0)
    np.testing.assert_allclose(moved.lab_std, target.lab_std, rtol=0.05, atol=0.3)


@pytest.fixture(scope="module")
def restained(tmp_path_factory):
    """One synthetic field rendered twice from one seed: with its own stain and with a per-slide
    stain jitter of 0.3 (`nic synth --stain-jitter`), i.e. a restained copy of the same tissue."""
    images = []
    for jitter in (0.0, 0.3):
        path = tmp_path_factory.mktemp("restain") / f"j{jitter}.tif"
        write_synthetic_slide(path, 1024, 1024, 0.5, seed=7, stain_jitter=jitter)
        with open_slide(path) as slide:
            images.append(slide.read_region((0, 0), (1024, 1024), 0)[..., :3])
    return images


@pytest.mark.parametrize("method, bound", [("macenko", 0.4), ("reinhard", 0.75)])
def test_a_restained_copy_is_brought_back_close_to_the_original(restained, method, bound):
    original, copy = restained
    tissue = optical_density(original).mean(axis=-1) > 0.1

    def error(image):
        return np.abs(image.astype(np.float64) - original)[tissue].mean()

    assert error(copy) > 5  # the jitter changed the colours
    back = normalise(copy, fit_stain(method, copy), fit_stain(method, original))
    assert error(back) < bound * error(copy)


def test_glass_stays_white():
    white = np.full((8, 32, 32, 3), 255, np.uint8)
    source = fit_stain("macenko", beer_lambert(STAINS["lab B"])[0])
    target = fit_stain("macenko", beer_lambert(STAINS["standard"])[0])
    assert (normalise(white, source, target) == 255).all()
    source, target = (fit_stain("reinhard", beer_lambert(STAINS[k])[0]) for k in ("lab B", "standard"))
    assert (normalise(white, source, target) == 255).all()


@pytest.mark.parametrize("method", METHODS)
def test_too_little_tissue_gives_no_stain_and_the_identity(method):
    rng = np.random.default_rng(0)
    image = np.full((64, 64, 3), 250, np.uint8)
    image[:5, :5] = beer_lambert(STAINS["standard"], side=5)[0]  # 25 stained pixels
    assert fit_stain(method, image) is None
    assert fit_stain(method, np.full((64, 64, 3), 255, np.uint8)) is None
    target = fit_stain(method, beer_lambert(STAINS["standard"])[0])
    assert normalise(image, None, target) is image
    patches = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(normaliser(method, target.values, None)(patches), patches)
    np.testing.assert_array_equal(normaliser("none", (), None)(patches), patches)


def test_one_stain_only_is_no_macenko_fit_rather_than_nan():
    haematoxylin_only = beer_lambert(np.stack([STAINS["standard"][0], STAINS["standard"][0]]))[0]
    assert fit_stain("macenko", haematoxylin_only) is None


def test_cohort_median_and_stain_numbers():
    fits = [fit_stain("macenko", beer_lambert(STAINS[k], seed=i)[0]) for i, k in enumerate(["standard", "lab B"] * 2)]
    fits.append(fit_stain("macenko", beer_lambert(STAINS["standard"], seed=9)[0]))
    median = median_stain(fits)
    np.testing.assert_allclose(np.linalg.norm(median.stains, axis=1), 1.0, atol=1e-4)
    assert (median.stains * STAINS["standard"]).sum(axis=1).min() > 0.999  # three of five are "standard"
    with pytest.raises(ValueError, match="8 numbers"):
        Stain("macenko", (1.0, 2.0))
    with pytest.raises(ValueError, match="unknown stain method"):
        fit_stain("vahadane", np.zeros((4, 4, 3), np.uint8))
    assert Stain.of("reinhard", [np.nan] * 6) is None


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cupy_fits_and_normalises_as_numpy(method):
    import cupy

    source_rgb = beer_lambert(STAINS["lab B"])[0]
    target_rgb = beer_lambert(STAINS["standard"], seed=1)[0]
    source, target = fit_stain(method, source_rgb), fit_stain(method, target_rgb)
    on_gpu = fit_stain(method, cupy.asarray(source_rgb))
    np.testing.assert_allclose(on_gpu.values, source.values, rtol=1e-3, atol=1e-3)
    out = normalise(cupy.asarray(source_rgb), source, target)
    assert isinstance(out, cupy.ndarray) and out.dtype == cupy.uint8
    assert np.abs(out.get().astype(int) - normalise(source_rgb, source, target)).max() <= 1
