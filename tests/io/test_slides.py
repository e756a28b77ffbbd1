"""Slide readers: cuCIM and OpenSlide behind one interface, µm/px rules, bad input, `nic info`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from skimage.transform import resize

from pipeline.cli import main
from pipeline.errors import NicError, SlideError
from pipeline.io import find_slides, has_gpu, open_slide, read_mpp_csv, resample
from tests.conftest import shared_path

CMU = ("slides", "CMU-1-Small-Region.svs")
TCGA_J2K = ("slides", "TCGA-CR-7395-01A-01-TS1.svs")
TCGA_DICOM = ("slides", "TCGA-XK-AAJU-01A-01-TS1_small_dicom.dcm")
READERS = ("cucim", "openslide")


# ---------------------------------------------------------------------------- fixtures


def smooth_image(size: int = 1024) -> np.ndarray:
    """A smooth RGB pattern that survives JPEG and 2x downsampling with small error."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rgb = np.stack(
        [128 + 100 * np.sin(xx / 40), 128 + 100 * np.cos(yy / 30), 128 + 90 * np.sin((xx + yy) / 60)], axis=-1
    )
    return rgb.astype(np.uint8)


def write_aperio_tiff(path, image: np.ndarray, mpp: float = 0.5, levels: int = 3, compression="jpeg"):
    """A pyramidal tiled TIFF with an Aperio-style description (levels as separate IFDs)."""
    height, width = image.shape[:2]
    header = f"Aperio Image Library v12.0.0 \n{width}x{height} [0,0 {width}x{height}] (256x256) JPEG Q=90"
    with tifffile.TiffWriter(path) as tiff:
        level = image
        for index in range(levels):
            description = (
                f"{header}|AppMag = 20|MPP = {mpp}"
                if index == 0
                else f"Aperio Image Library v12.0.0 \n{width}x{height} -> {level.shape[1]}x{level.shape[0]} JPEG Q=90"
            )
            extra = {"compressionargs": {"level": 90}} if compression == "jpeg" else {}
            tiff.write(level, tile=(256, 256), compression=compression, photometric="rgb",
                       description=description, metadata=None, **extra)
            h, w = level.shape[0] // 2, level.shape[1] // 2
            level = level[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean((1, 3)).round().astype(np.uint8)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(path, image) of a 1024x1024 three-level Aperio-style JPEG TIFF at 0.5 µm/px."""
    image = smooth_image(1024)
    path = write_aperio_tiff(tmp_path_factory.mktemp("synthetic") / "synthetic-slide.svs", image)
    return path, image


def truncated_copy(source, path, keep: int):
    path.write_bytes(source.read_bytes()[:keep])
    return path


def written(path, data: bytes):
    path.write_bytes(data)
    return path


def run_nic(*args) -> subprocess.CompletedProcess:
    """`nic ARGS` in a fresh interpreter, so stderr holds everything the C readers print too."""
    code = "from pipeline.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)


def diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))


# ---------------------------------------------------------------------------- finding slides and mpp CSV


def test_find_slides_recurses_filters_sorts_and_deduplicates(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    for name in ("a.svs", "b/deep/c.NDPI", "b/d.tiff", "b/notes.txt", "b/e.png", "z.mrxs"):
        (tmp_path / name).write_bytes(b"x")
    found = find_slides([tmp_path, tmp_path / "a.svs", tmp_path / "b"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.svs", "b/d.tiff", "b/deep/c.NDPI", "z.mrxs"]


def test_find_slides_names_a_missing_path(tmp_path):
    with pytest.raises(SlideError, match="nowhere.*no such file or directory"):
        find_slides([tmp_path, tmp_path / "nowhere"])


def test_find_slides_rejects_an_explicit_unsupported_file(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"x")
    with pytest.raises(SlideError, match=r"photo.png: unsupported extension '.png'"):
        find_slides(tmp_path / "photo.png")


def test_read_mpp_csv(tmp_path):
    good = tmp_path / "mpp.csv"
    good.write_text("slide_id,mpp\nA,0.25\nB, 0.5\n")
    assert read_mpp_csv(good) == {"A": 0.25, "B": 0.5}
    wrong_columns = tmp_path / "wrong.csv"
    wrong_columns.write_text("slide,um\nA,0.25\n")
    with pytest.raises(NicError, match="slide_id,mpp"):
        read_mpp_csv(wrong_columns)
    bad_value = tmp_path / "bad.csv"
    bad_value.write_text("slide_id,mpp\nA,-1\n")
    with pytest.raises(NicError, match="line 2"):
        read_mpp_csv(bad_value)


# ---------------------------------------------------------------------------- real slides


def test_cmu_svs_opens_with_cucim_and_reports_metadata():
    with open_slide(shared_path(*CMU)) as slide:
        described = slide.describe()
    assert described["reader"] == "cucim"
    assert (described["format"], described["vendor"]) == ("aperio", "aperio")
    assert (described["width"], described["height"]) == (2220, 2967)
    assert described["levels"] == [{"level": 0, "width": 2220, "height": 2967, "downsample": 1.0}]
    assert described["mpp"] == pytest.approx(0.499)
    assert described["slide_id"] == "CMU-1-Small-Region"
    json.dumps(described)


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


def test_slide_without_mpp_fails_require_mpp_with_the_fix():
    path = shared_path(*TCGA_J2K)
    with open_slide(path) as slide:
        with pytest.raises(SlideError) as caught:
            slide.require_mpp()
        with pytest.raises(SlideError):
            slide.read_regions_at_mpp([(0, 0)], 64, 1.0)
    message = str(caught.value)
    assert message.startswith(str(path)) and "--mpp" in message and "--mpp-csv" in message and "slide_id,mpp" in message


def test_mpp_override_wins_and_picks_levels():
    path = shared_path(*TCGA_J2K)
    with open_slide(path, mpp=0.25) as slide:
        assert slide.require_mpp() == 0.25
        assert slide.level_for_mpp(0.25) == 0
        assert slide.level_for_mpp(0.5) == 1  # downsample 2.0005 is within tolerance of 2
        assert slide.level_for_mpp(0.4) == 0
    with open_slide(shared_path(*CMU), mpp=0.3) as slide:
        assert slide.mpp == 0.3


# ---------------------------------------------------------------------------- synthetic pyramid


@pytest.mark.parametrize("reader", READERS)
def test_synthetic_pyramid_geometry_and_mpp(synthetic, reader):
    path, _ = synthetic
    with open_slide(path, reader=reader) as slide:
        assert slide.reader == reader and slide.format == "aperio"
        assert slide.dimensions == (1024, 1024) and slide.level_count == 3
        assert slide.level_dimensions == [(1024, 1024), (512, 512), (256, 256)]
        assert slide.level_downsamples == pytest.approx([1, 2, 4])
        assert slide.mpp == pytest.approx(0.5)


def test_teammate_synthetic_slide_reads_the_same_in_both_readers(tmp_path):
    synth = pytest.importorskip("pipeline.synth")
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


# ---------------------------------------------------------------------------- fallback and bad input


def test_falls_back_to_openslide_when_cucim_cannot_decode(tmp_path):
    path = write_aperio_tiff(tmp_path / "packbits.tif", smooth_image(512), levels=1, compression="packbits")
    with open_slide(path) as slide:  # cuCIM opens packbits tiles but cannot decode them
        assert slide.reader == "openslide"
        np.testing.assert_array_equal(slide.read_region((10, 20), (30, 40)), smooth_image(512)[20:60, 10:40])
    with pytest.raises(SlideError, match="cucim: .*not supported"):
        open_slide(path, reader="cucim")


def test_dicom_non_conformant_gets_a_clear_reason():
    path = shared_path(*TCGA_DICOM)
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a conformant DICOM whole-slide image")
    assert "PixelSpacing" in message and "openslide" in message and "\n" not in message


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda d: truncated_copy(shared_path(*CMU), d / "cut.svs", 1_000_000), "truncated or corrupt"),
        (lambda d: truncated_copy(shared_path(*CMU), d / "tiny.svs", 300), "truncated or corrupt"),
        (lambda d: written(d / "zero.svs", b""), "empty file"),
        (lambda d: written(d / "text.svs", b"just some text\n"), "not a slide"),
        (lambda d: d / "missing.svs", "no such file"),
        (lambda d: written(d / "slide.png", b"\x89PNG"), "unsupported extension"),
        (lambda d: d, "not a file"),
    ],
)
def test_bad_input_gives_one_slide_error(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    assert caught.value.path == str(path) and reason in caught.value.reason
    assert "\n" not in str(caught.value)


def test_truncated_tile_data_is_caught_before_reading(synthetic, tmp_path):
    path = truncated_copy(synthetic[0], tmp_path / "cut-data.svs", synthetic[0].stat().st_size - 3000)
    with pytest.raises(SlideError, match=r"truncated: image 2 needs \d+ bytes but the file has \d+"):
        open_slide(path)


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


def test_bad_options_are_nic_errors(synthetic):
    with pytest.raises(NicError, match="unknown reader"):
        open_slide(synthetic[0], reader="bioformats")
    with pytest.raises(NicError, match="positive"):
        open_slide(synthetic[0], mpp=0)
    with open_slide(synthetic[0]) as slide, pytest.raises(SlideError, match="level 5 does not exist"):
        slide.read_region((0, 0), (8, 8), level=5)


@pytest.mark.skipif(has_gpu(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(synthetic):
    with pytest.raises(NicError, match="no CUDA GPU"):
        open_slide(synthetic[0], device="cuda")


# ---------------------------------------------------------------------------- nic info


def test_nic_info_json_cmu_and_tcga():
    runner = CliRunner()
    cmu = runner.invoke(main, ["info", "--json", str(shared_path(*CMU))])
    assert cmu.exit_code == 0, cmu.output
    assert json.loads(cmu.output)["mpp"] == pytest.approx(0.499)
    tcga = runner.invoke(main, ["info", "--json", str(shared_path(*TCGA_J2K))])
    assert tcga.exit_code == 0, tcga.output
    described = json.loads(tcga.output)
    assert described["mpp"] is None and len(described["levels"]) == 2


def test_nic_info_text_and_mpp_override():
    result = CliRunner().invoke(main, ["info", "--mpp", "0.25", str(shared_path(*TCGA_J2K))])
    assert result.exit_code == 0
    assert "mpp: 0.25" in result.output and "1: 2221 x 1783" in result.output


@pytest.mark.parametrize("name", ["cut.svs", "text.svs"])
def test_nic_info_bad_file_prints_one_line_and_exits_2(tmp_path, name):
    path = tmp_path / name
    if name == "cut.svs":
        truncated_copy(shared_path(*CMU), path, 1_000_000)
    else:
        path.write_text("not a slide\n")
    done = run_nic("info", path)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ")


def test_nic_info_dicom_exits_2_with_reason():
    path = shared_path(*TCGA_DICOM)
    done = run_nic("info", path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "not a conformant DICOM whole-slide image" in done.stderr


# ---------------------------------------------------------------------------- GPU path (same code, device="cuda")


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


@pytest.mark.gpu
def test_gpu_openslide_reader_returns_cupy(synthetic):
    import cupy

    with open_slide(synthetic[0], reader="openslide", device="cuda") as slide:
        assert isinstance(slide.read_regions([(0, 0)], (16, 16)), cupy.ndarray)


def test_a_scan_within_two_percent_of_the_target_is_read_without_resampling():
    """CMU-1 is 0.499 µm/px: read at 0.5 it gives the level-0 pixels unchanged, (w, h) sized."""
    with open_slide(shared_path("slides", "CMU-1-Small-Region.svs")) as slide:
        region = slide.read_regions_at_mpp([(100, 200)], (300, 200), 0.5)[0]
        np.testing.assert_array_equal(region, slide.read_region((100, 200), (300, 200), 0))
