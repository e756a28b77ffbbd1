"""pipeline/io/tiff.py: corrupt JPEG tiles fail the reads that touch them, in both readers, and a
header that claims more pixels than the file can hold fails at open."""

from __future__ import annotations

import numpy as np
import pytest

from nic_pipeline.errors import SlideError
from nic_pipeline.io import open_slide
from nic_pipeline.synth import write_synthetic_slide
from tests.conftest import shared_path
from tests.io.helpers import CMU, READERS, claim_size, damage_tiles, run_nic, smooth_image, write_aperio_tiff

DAMAGED = (1, 6, 11, 14)  # level-0 tiles of the 4 x 4 grid: (1, 0), (2, 1), (3, 2), (2, 3)


@pytest.fixture(scope="module")
def synth_slide(tmp_path_factory):
    """A slide as `nic synth` writes it: 1024 x 1024 px, 256 px JPEG tiles, levels 1024 and 256 px."""
    path = tmp_path_factory.mktemp("synth") / "synth.tif"
    write_synthetic_slide(path, 1024, 1024, mpp=0.5, seed=3)
    return path


def tile_regions(slide, level: int = 0, tile: int = 256):
    """Top-left corners (level-0 px) and (column, row) of every tile of ``level``."""
    width, height = slide.level_dimensions[level]
    k = round(slide.level_downsamples[level])
    return [((c * tile * k, r * tile * k), (c, r)) for r in range(-(-height // tile)) for c in range(-(-width // tile))]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("how", ["flip", "zero"])
def test_reads_touching_a_damaged_tile_fail_naming_it(synth_slide, tmp_path, reader, how):
    path = damage_tiles(synth_slide, tmp_path / f"{how}.tif", DAMAGED, how)
    failed = []
    with open_slide(path, reader=reader) as slide, open_slide(synth_slide, reader=reader) as clean:
        for location, (column, row) in tile_regions(slide):
            try:
                region = slide.read_region(location, (256, 256))
            except SlideError as err:
                assert f"corrupt JPEG tile at level 0, tile ({column}, {row})" in str(err)
                assert str(err).startswith(f"{path}: cannot read 256x256 px at {location} level 0: ")
                assert "\n" not in str(err)
                failed.append(row * 4 + column)
            else:
                np.testing.assert_array_equal(region, clean.read_region(location, (256, 256)))
        for locations, size in [([(0, 0), (700, 700)], (300, 300)), ([(0, 0)], (1024, 1024))]:
            with pytest.raises(SlideError, match=r"corrupt JPEG tile at level 0, tile \(1, 0\)"):
                slide.read_regions(locations, size)  # the first bad tile in row order (16 tiles: on all cores)
        slide.read_region((0, 0), (256, 256), level=1)  # other levels are not damaged
    assert failed == list(DAMAGED)


@pytest.mark.parametrize("reader", READERS)
def test_a_damaged_tile_of_the_thumbnail_level_fails_the_thumbnail(synth_slide, tmp_path, reader):
    path = damage_tiles(synth_slide, tmp_path / "thumb.tif", [0], "flip", page=1)  # level 1: one tile
    with open_slide(path, reader=reader) as slide:
        with pytest.raises(SlideError, match=r"thumbnail: corrupt JPEG tile at level 1, tile \(0, 0\)"):
            slide.thumbnail(max_size=200)


def test_damaged_tiles_behind_shared_jpeg_tables_are_found(tmp_path):
    """CMU-1's tiles are abbreviated JPEG streams with the tables stored once (JPEGTables)."""
    path = damage_tiles(shared_path(*CMU), tmp_path / "cmu.svs", [20], "flip")
    with open_slide(path) as slide:
        columns = -(-slide.dimensions[0] // 240)
        column, row = 20 % columns, 20 // columns
        slide.read_region((0, 0), (240, 240))
        with pytest.raises(SlideError, match=rf"corrupt JPEG tile at level 0, tile \({column}, {row}\).*Corrupt JPEG"):
            slide.read_region((column * 240 + 10, row * 240 + 10), (16, 16))


@pytest.mark.parametrize("reader", READERS)
def test_clean_slides_read_the_same_pixels_with_the_check(synth_slide, reader):
    for path in (synth_slide, shared_path(*CMU)):
        with open_slide(path, reader=reader) as checked, open_slide(path, reader=reader, check_tiles=False) as plain:
            for level in range(checked.level_count):
                size = checked.level_dimensions[level]
                np.testing.assert_array_equal(checked.read_regions([(0, 0)], size, level),
                                              plain.read_regions([(0, 0)], size, level))


# ---------------------------------------------------------------------------- sizes a file cannot back


@pytest.fixture(scope="module")
def small_tiff(tmp_path_factory):
    return write_aperio_tiff(tmp_path_factory.mktemp("small") / "small.svs", smooth_image(512), levels=1)


def test_a_300000_px_header_on_an_11_mb_file_fails_at_open(small_tiff, tmp_path):
    path = claim_size(small_tiff, tmp_path / "huge.svs", 300_000, 300_000, fill_tiles=True)
    assert 10e6 < path.stat().st_size < 12e6
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: implausible size: image 0 claims 300000 x 300000 px (270.0 GB as RGB)")
    assert "11.0 MB" in message and "\n" not in message
    done = run_nic("info", path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: {message}"]


def test_a_header_larger_than_its_tile_table_fails_at_open(small_tiff, tmp_path):
    path = claim_size(small_tiff, tmp_path / "patched.svs", 300_000, 300_000, fill_tiles=False)
    with pytest.raises(SlideError, match=r"image 0 claims 300000 x 300000 px in 256 x 256 px tiles "
                                         r"\(1373584 tiles\) but lists 4 tile offsets"):
        open_slide(path)


# ---------------------------------------------------------------------------- reads decoded from the tiles


@pytest.mark.parametrize("reader", READERS)
def test_regions_decoded_from_ycbcr_tiles_equal_the_readers_pixels(synth_slide, reader):
    """One region to the CPU from YCbCr tiles is decoded from the tiles (the strict check is the
    decode): the same pixels as the reader's own, for regions across tile edges and levels."""
    regions = [((0, 0), (1024, 1024), 0), ((130, 7), (300, 517), 0), ((768, 768), (256, 256), 0),
               ((1000, 3), (24, 1021), 0), ((0, 0), (256, 256), 1), ((4, 8), (100, 60), 1)]
    with open_slide(synth_slide, reader=reader) as tiles, open_slide(synth_slide, reader=reader, check_tiles=False) as plain:
        assert tiles.decoder == plain.decoder  # nothing decoded yet
        for location, size, level in regions:
            np.testing.assert_array_equal(tiles.read_region(location, size, level), plain.read_region(location, size, level))
        assert tiles.decoder == "libjpeg-turbo-tiles" != plain.decoder


def test_rgb_coded_tiles_and_regions_beyond_the_image_stay_with_the_reader(synth_slide):
    """Aperio's RGB-coded JPEG would be taken for YCbCr by libjpeg: such tiles go to the reader
    (after the check), as do regions that reach past the image."""
    with open_slide(shared_path(*CMU)) as slide:
        slide.read_region((0, 0), (500, 500))
        assert slide.decoder == "cucim-cpu"
    with open_slide(synth_slide) as slide, open_slide(synth_slide, check_tiles=False) as plain:
        np.testing.assert_array_equal(slide.read_region((900, 900), (200, 200)), plain.read_region((900, 900), (200, 200)))
        assert slide.decoder == "cucim-cpu"
