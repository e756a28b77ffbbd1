"""pipeline/io/openslide_backend.py: OpenSlide gives the same pixels as cuCIM (real and generated
slides), white outside the scan, an error naming the region on a corrupt tile, CuPy on "cuda"."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile

from nic_pipeline.errors import SlideError
from nic_pipeline.io import open_slide
from tests.conftest import shared_path
from tests.io.helpers import CMU, READERS, diff


@pytest.mark.parametrize("location,size", [((0, 0), (300, 200)), ((1000, 1500), (256, 256)), ((2100, 2900), (200, 100))])
def test_cmu_same_pixels_from_cucim_and_openslide(location, size):
    path = shared_path(*CMU)
    with open_slide(path, reader="cucim") as cu, open_slide(path, reader="openslide") as osl:
        a, b = cu.read_region(location, size), osl.read_region(location, size)
    assert a.shape == b.shape == (size[1], size[0], 3) and a.dtype == b.dtype == np.uint8
    assert diff(a, b).mean() < 1.0 and np.percentile(diff(a, b), 99) <= 8  # JPEG decoder tolerance
    assert a.std() > 5  # real content, not a blank fill


def test_region_outside_the_slide_is_white_in_both_readers():
    path = shared_path(*CMU)
    for reader in READERS:
        with open_slide(path, reader=reader) as slide:
            region = slide.read_region((2200, 2950), (64, 64))
        assert (region[30:, 30:] == 255).all(), reader  # past the 2220x2967 edge


def test_teammate_synthetic_slide_reads_the_same_in_both_readers(tmp_path):
    synth = pytest.importorskip("nic_pipeline.synth")
    path = tmp_path / "synth-slide.tif"
    synth.write_synthetic_slide(path, 1536, 1024, mpp=0.5, seed=0)
    with open_slide(path, reader="cucim") as cu, open_slide(path, reader="openslide") as osl:
        assert cu.describe() | {"reader": None} == osl.describe() | {"reader": None}
        assert cu.level_dimensions == synth.level_dimensions(1536, 1024) and cu.mpp == 0.5
        for level in range(cu.level_count):
            a = cu.read_regions([(100, 100), (600, 300)], (120, 90), level)
            b = osl.read_regions([(100, 100), (600, 300)], (120, 90), level)
            assert diff(a, b).max() <= 2 and a.std() > 5


@pytest.mark.parametrize("level", [0, 1, 2])
def test_synthetic_same_pixels_in_both_readers_and_close_to_truth(synthetic, level):
    path, image = synthetic
    location, size = (256, 512), (100, 80)
    with open_slide(path, reader="cucim") as cu, open_slide(path, reader="openslide") as osl:
        a, b = cu.read_region(location, size, level), osl.read_region(location, size, level)
    assert diff(a, b).max() <= 2
    k = 2**level
    truth = image[512 : 512 + 80 * k, 256 : 256 + 100 * k].reshape(80, k, 100, k, 3).mean((1, 3))
    assert diff(a, truth).mean() < 3


def test_corrupt_tile_raises_on_read_naming_file_and_location(synthetic, tmp_path):
    path = tmp_path / "corrupt.svs"
    shutil.copy(synthetic[0], path)
    with tifffile.TiffFile(path) as tiff:
        offset, count = tiff.pages[0].dataoffsets[0], tiff.pages[0].databytecounts[0]
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * count)
    with open_slide(path, reader="openslide") as slide:
        slide.read_region((512, 512), (32, 32))  # other tiles still read
        with pytest.raises(SlideError, match=r"corrupt.svs: cannot read 32x32 px at \(0, 0\) level 0: .*JPEG"):
            slide.read_region((0, 0), (32, 32))


@pytest.mark.gpu
def test_gpu_openslide_reader_returns_cupy(synthetic):
    import cupy

    with open_slide(synthetic[0], reader="openslide", device="cuda") as slide:
        assert isinstance(slide.read_regions([(0, 0)], (16, 16)), cupy.ndarray)
