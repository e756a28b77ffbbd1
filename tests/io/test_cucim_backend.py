"""pipeline/io/cucim_backend.py: cuCIM reads JPEG 2000 SVS like OpenSlide, hands undecodable TIFFs
to OpenSlide, reads to the GPU (device="cuda") the same pixels as on the CPU, and says which
decoder ran (nvImageCodec on the GPU when a working one is there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nic_pipeline.errors import SlideError
from nic_pipeline.io import open_slide
from nic_pipeline.io.cucim_backend import (
    GPU_DECODING_ENV,
    decoder_name,
    loaded_plugins,
    nvimgcodec_problem,
    nvimgcodec_version,
)
from nic_pipeline.runtime.device import cupy_gpu
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


# ---------------------------------------------------------------------------- which decoder runs


def test_each_slide_names_the_decoder_that_ran():
    path = shared_path(*TCGA_J2K)
    with open_slide(path) as cu, open_slide(path, reader="openslide") as osl:
        assert (cu.decoder, osl.decoder) == ("cucim-cpu", "openslide")
    assert any(plugin.startswith("cucim.kit.cuslide@") for plugin in loaded_plugins())


def test_decoder_name_follows_the_plugin_cucim_loaded():
    assert decoder_name(["cucim.kit.cumed@26.06.00.so", "cucim.kit.cuslide2@26.06.00.so"], "cuda") == "cucim-nvimagecodec"
    assert decoder_name(["cucim.kit.cuslide@26.06.00.so"], "cuda") == "cucim-nvjpeg"
    assert decoder_name(["cucim.kit.cuslide@26.06.00.so"], "cpu") == "cucim-cpu"


def test_nvimagecodec_0_9_is_refused_for_its_broken_gpu_jpeg_regions():
    assert "NVIDIA/nvImageCodec#55" in nvimgcodec_problem("0.9.0.20")
    assert nvimgcodec_problem("0.8.0") is None and nvimgcodec_problem("0.10.1") is None
    assert "not installed" in nvimgcodec_problem(None)


def run_fresh(code: str, **env) -> str:
    """stdout of ``code`` in a fresh interpreter (cuCIM picks its decoder once per process)."""
    environment = {k: v for k, v in os.environ.items() if k != GPU_DECODING_ENV} | env
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(cupy_gpu(), reason="checks the machine without a GPU")
def test_gpu_decoding_stays_off_without_a_gpu():
    code = ("import os; from nic_pipeline.io.cucim_backend import prepare_gpu_decoding as p; "
            "print(p(), os.environ.get('ENABLE_CUSLIDE2'))")
    assert run_fresh(code) == "no CUDA GPU None"
    assert run_fresh(code, ENABLE_CUSLIDE2="0") == "ENABLE_CUSLIDE2=0 was set 0"


@pytest.mark.gpu
def test_gpu_decoding_uses_nvimagecodec_and_matches_libjpeg(synthetic, tmp_path):
    """device="cuda" in a fresh process: cuslide2 + nvImageCodec when a working one is installed,
    and its pixels match libjpeg-turbo's decode of the same tiles (tifffile) within decoder tolerance."""
    out = tmp_path / "gpu.npy"
    code = (
        "import numpy, cupy; from nic_pipeline.io import open_slide\n"
        f"slide = open_slide({str(synthetic[0])!r}, device='cuda')\n"
        "batch = slide.read_regions([(0, 0), (300, 500), (700, 260)], (256, 256), 0)\n"
        f"numpy.save({str(out)!r}, cupy.asnumpy(batch)); print(slide.decoder)"
    )
    decoder = run_fresh(code)
    expected = "cucim-nvimagecodec" if nvimgcodec_problem(nvimgcodec_version()) is None else "cucim-nvjpeg"
    assert decoder == expected
    with tifffile.TiffFile(synthetic[0]) as tiff:
        level0 = tiff.pages[0].asarray()
    truth = np.stack([level0[y : y + 256, x : x + 256] for x, y in [(0, 0), (300, 500), (700, 260)]])
    gpu = np.load(out)
    assert gpu.shape == truth.shape and diff(gpu, truth).mean() < 1.0 and np.percentile(diff(gpu, truth), 99) <= 8


@pytest.mark.slow
def test_opening_slides_prints_no_cufile_noise_and_writes_nothing_here(tmp_path):
    """With torch's CUDA wheels installed and no GPU, cuFile printed 'dlopen error libcuda.so.1 …
    cuFile initialization failed' at every slide open and wrote cufile.log into the current folder."""
    svs = shared_path("slides", "CMU-1-Small-Region.svs")
    code = ("import torch\nfrom nic_pipeline.io import open_slide\n"
            f"with open_slide({str(svs)!r}) as s:\n    s.read_region((0, 0), (64, 64))\n"
            f"with open_slide({str(svs)!r}) as s:\n    print(s.reader)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cucim"
    assert "cuFile" not in done.stdout + done.stderr and "libcuda" not in done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []
