"""pipeline/io/cucim_backend.py: cuCIM reads JPEG 2000 SVS like OpenSlide, hands undecodable TIFFs
to OpenSlide, and reads to the GPU (device="cuda") the same pixels as on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from pipeline.errors import SlideError
from pipeline.io import open_slide
from tests.conftest import shared_path
from tests.io.helpers import TCGA_J2K, diff, smooth_image, write_aperio_tiff


def test_jpeg2000_svs_reads_with_cucim_like_openslide_and_has_no_mpp():
    path = shared_path(*TCGA_J2K)
    with open_slide(path) as cu, open_slide(path, reader="openslide") as osl:
        assert cu.reader == "cucim" and cu.mpp is None and osl.mpp is None
        assert cu.level_dimensions == [(4443, 3567), (2221, 1783)]
        assert cu.level_downsamples == pytest.approx(osl.level_downsamples)
        a, b = cu.read_region((1000, 1000), (256, 256)), osl.read_region((1000, 1000), (256, 256))
        assert diff(a, b).max() == 0 and a.std() > 5
        # level 1 has downsample 2.0005: cuCIM starts at floor(1000 / 2.0005) = 499 exactly,
        # OpenSlide interpolates at 499.875, so the two agree only up to that sub-pixel shift
        a, b = cu.read_region((1000, 1000), (256, 256), 1), osl.read_region((1000, 1000), (256, 256), 1)
        with tifffile.TiffFile(path) as tiff:
            level1 = tiff.pages[2].asarray()
        np.testing.assert_array_equal(a, level1[499:755, 499:755])
        assert diff(b, level1[500:756, 500:756]).mean() < 4 < diff(b, level1[499:755, 499:755]).mean()


def test_falls_back_to_openslide_when_cucim_cannot_decode(tmp_path):
    path = write_aperio_tiff(tmp_path / "packbits.tif", smooth_image(512), levels=1, compression="packbits")
    with open_slide(path) as slide:  # cuCIM opens packbits tiles but cannot decode them
        assert slide.reader == "openslide"
        np.testing.assert_array_equal(slide.read_region((10, 20), (30, 40)), smooth_image(512)[20:60, 10:40])
    with pytest.raises(SlideError, match="cucim: .*not supported"):
        open_slide(path, reader="cucim")


@pytest.mark.gpu
def test_gpu_reads_equal_cpu_reads(synthetic):
    import cupy

    locations = [(0, 0), (300, 500), (900, 100)]
    with open_slide(synthetic[0]) as cpu, open_slide(synthetic[0], device="cuda") as gpu:
        for level in (0, 1):
            on_gpu = gpu.read_regions(locations, (64, 64), level)
            assert isinstance(on_gpu, cupy.ndarray) and on_gpu.dtype == cupy.uint8
            assert diff(cupy.asnumpy(on_gpu), cpu.read_regions(locations, (64, 64), level)).max() <= 2
        single = gpu.read_region((10, 10), (32, 16))
        assert isinstance(single, cupy.ndarray) and single.shape == (16, 32, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("target", [1.0, 1.5])
def test_gpu_read_at_mpp_equals_cpu(synthetic, target):
    import cupy

    with open_slide(synthetic[0]) as cpu, open_slide(synthetic[0], device="cuda") as gpu:
        a = gpu.read_regions_at_mpp([(100, 100), (500, 300)], 64, target)
        b = cpu.read_regions_at_mpp([(100, 100), (500, 300)], 64, target)
    assert isinstance(a, cupy.ndarray) and a.shape == b.shape
    assert diff(cupy.asnumpy(a), b).max() <= 2
