"""pipeline/io/base.py: the Slide interface, the same whichever reader: batches, levels, reads at a
target µm/px, thumbnails, resampling, option errors."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import resize

from nic_pipeline.errors import NicError, SlideError
from nic_pipeline.io import open_slide, resample
from nic_pipeline.runtime.device import cupy_gpu
from tests.conftest import shared_path
from tests.io.helpers import CMU, READERS, diff


@pytest.mark.parametrize("reader", READERS)
def test_batched_reads_equal_single_reads_in_order(synthetic, reader):
    path, _ = synthetic
    locations = [(0, 0), (700, 100), (10, 900), (512, 512), (900, 900)] * 8  # 40: more than one cuCIM batch
    with open_slide(path, reader=reader) as slide:
        batch = slide.read_regions(locations, (48, 32), level=1)
        singles = np.stack([slide.read_region(loc, (48, 32), level=1) for loc in locations])
        empty = slide.read_regions([], (48, 32))
    assert batch.shape == (40, 32, 48, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch, singles)
    assert empty.shape == (0, 32, 48, 3)


@pytest.mark.parametrize(
    "target,level", [(0.25, 0), (0.5, 0), (0.504, 0), (0.75, 0), (1.0, 1), (1.5, 1), (2.0, 2), (16.0, 2)]
)
def test_level_for_mpp_is_the_coarsest_level_not_coarser_than_target(synthetic, target, level):
    with open_slide(synthetic[0]) as slide:
        assert slide.level_for_mpp(target) == level


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("target", [0.5, 1.0, 1.5, 2.0, 4.0])
def test_read_regions_at_mpp_matches_a_resampled_crop_of_the_truth(synthetic, reader, target):
    path, image = synthetic
    size = 64
    locations = [(128, 64), (300, 400)]
    with open_slide(path, reader=reader) as slide:
        out = slide.read_regions_at_mpp(locations, size, target)
    assert out.shape == (2, size, size, 3) and out.dtype == np.uint8
    span = round(size * target / 0.5)  # level-0 px covered by the output
    for got, (x, y) in zip(out, locations):
        truth = resize(image[y : y + span, x : x + span].astype(np.float32), (size, size, 3),
                       anti_aliasing=True, preserve_range=True)
        assert diff(got, truth).mean() < 3, (target, (x, y))


def test_read_regions_at_mpp_reads_the_chosen_level_directly_when_it_matches(synthetic):
    with open_slide(synthetic[0]) as slide:
        at_mpp = slide.read_regions_at_mpp([(200, 300)], 50, 1.0)
        direct = slide.read_regions([(200, 300)], (50, 50), level=1)
    np.testing.assert_array_equal(at_mpp, direct)


def test_a_scan_within_two_percent_of_the_target_is_read_without_resampling():
    """CMU-1 is 0.499 µm/px: read at 0.5 it gives the level-0 pixels unchanged, (w, h) sized."""
    with open_slide(shared_path("slides", "CMU-1-Small-Region.svs")) as slide:
        region = slide.read_regions_at_mpp([(100, 200)], (300, 200), 0.5)[0]
        np.testing.assert_array_equal(region, slide.read_region((100, 200), (300, 200), 0))


def test_thumbnail_fits_max_size_and_keeps_aspect():
    with open_slide(shared_path(*CMU)) as slide:
        thumb = slide.thumbnail(max_size=256)
        region = slide.read_region((0, 0), slide.dimensions)
    assert isinstance(thumb, np.ndarray) and thumb.dtype == np.uint8
    assert thumb.shape == (256, round(2220 * 256 / 2967), 3)
    expected = resize(region.astype(np.float32), thumb.shape, anti_aliasing=True, preserve_range=True)
    assert diff(thumb, expected).mean() < 2


def test_thumbnail_uses_a_coarse_level(synthetic):
    with open_slide(synthetic[0]) as slide:
        assert slide.thumbnail(max_size=300).shape == (300, 300, 3)
        assert slide.thumbnail(max_size=4096).shape == (1024, 1024, 3)  # never upsamples


def test_resample_block_mean_and_general_factor():
    batch = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    halved = resample(batch, 2)
    np.testing.assert_array_equal(halved[0, 0, 0], batch[0, :2, :2].reshape(-1, 3).mean(0).round())
    assert resample(batch, 4) is batch
    assert resample(np.full((3, 96, 96, 3), 77, np.uint8), 64).tolist() == np.full((3, 64, 64, 3), 77).tolist()


def test_bad_options_are_nic_errors(synthetic):
    with pytest.raises(NicError, match="unknown reader"):
        open_slide(synthetic[0], reader="bioformats")
    with pytest.raises(NicError, match="positive"):
        open_slide(synthetic[0], mpp=0)
    with open_slide(synthetic[0]) as slide, pytest.raises(SlideError, match="level 5 does not exist"):
        slide.read_region((0, 0), (8, 8), level=5)


@pytest.mark.skipif(cupy_gpu(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(synthetic):
    with pytest.raises(NicError, match="no CUDA GPU"):
        open_slide(synthetic[0], device="cuda")
