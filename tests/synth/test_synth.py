"""Synthetic slides: pyramid seen by both readers, determinism, lesion truth, cohort files."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from nic_pipeline import synth
from nic_pipeline.cli import main
from nic_pipeline.errors import NicError
from nic_pipeline.synth.stain import restain, restain_matrix, stain_scales
from nic_pipeline.synth.tiles import MAX_POOL, TilePools, _guess_tile_mpp, _is_background, _is_lesion, _roles, list_tiles
from tests.conftest import shared_path

MPP = 0.5


@pytest.fixture(scope="module")
def positive(tmp_path_factory):
    """A 2500 x 2100 slide (3 levels) with a 10 % lesion and pen marks."""
    path = tmp_path_factory.mktemp("pos") / "pos.tif"
    return synth.write_synthetic_slide(path, 2500, 2100, mpp=MPP, seed=11, lesion_fraction=0.1, pen_marks=True)


def _block_mean(img, f):
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    return img[:h, :w].reshape(h // f, f, w // f, f, -1).mean(axis=(1, 3))


def test_pyramid_rule():
    assert synth.pyramid_downsamples(30_000, 30_000) == [1, 4, 16, 64]
    assert synth.pyramid_downsamples(8192, 8192) == [1, 4, 16]
    assert synth.pyramid_downsamples(100_000, 100_000)[-1] == 256
    assert synth.pyramid_downsamples(400, 300) == [1]
    assert synth.level_dimensions(2500, 2100) == [(2500, 2100), (625, 525), (157, 132)]


def test_both_readers_see_levels_and_mpp(positive):
    openslide = pytest.importorskip("openslide")
    cucim = pytest.importorskip("cucim")
    dims = [(2500, 2100), (625, 525), (157, 132)]
    assert positive.level_dimensions == dims
    with openslide.OpenSlide(str(positive.path)) as slide:
        assert slide.level_count == 3
        assert [tuple(d) for d in slide.level_dimensions] == dims
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP)
        assert slide.properties["openslide.vendor"] == "aperio"
        region_os = np.asarray(slide.read_region((1000, 800), 0, (300, 200)))[..., :3]
    image = cucim.CuImage(str(positive.path))
    assert image.resolutions["level_count"] == 3
    assert [tuple(d) for d in image.resolutions["level_dimensions"]] == dims
    assert float(image.metadata["aperio"]["MPP"]) == pytest.approx(MPP)
    region_cu = np.asarray(image.read_region((1000, 800), (300, 200), 0))
    np.testing.assert_array_equal(region_cu, region_os)


def test_tiff_layout_separate_ifds_and_resolution(positive):
    with tifffile.TiffFile(positive.path) as tif:
        assert len(tif.pages) == 3                          # one IFD per level, no SubIFDs
        for level, page in enumerate(tif.pages):
            assert page.is_tiled and page.tilewidth == page.tilelength == 256
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert not page.subifds
            x_res = page.tags["XResolution"].value
            assert x_res[0] / x_res[1] == pytest.approx(1e4 / (MPP * 4**level))
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        desc = tif.pages[0].description
        assert desc.startswith("Aperio Image Library v12.0.0 \n2500x2100 [0,0 2500x2100] (256x256) JPEG Q=90|")
        assert "|MPP = 0.5" in desc and "|AppMag = 20" in desc


def test_levels_agree(positive):
    with tifffile.TiffFile(positive.path) as tif:
        level0 = tif.pages[0].asarray()[:2048, :2048].astype(np.float32)
        level1 = tif.pages[1].asarray()[:512, :512].astype(np.float32)
    coarse0 = _block_mean(level0, 32)
    coarse1 = _block_mean(level1, 8)
    assert np.abs(coarse0 - coarse1).mean() < 6.0
    assert coarse0.std() > 10                               # not a blank image


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synth.write_synthetic_slide(tmp_path / "a.tif", 1100, 700, seed=3, lesion_fraction=0.2, workers=1)
    b = synth.write_synthetic_slide(tmp_path / "b.tif", 1100, 700, seed=3, lesion_fraction=0.2, workers=2)
    c = synth.write_synthetic_slide(tmp_path / "c.tif", 1100, 700, seed=4, lesion_fraction=0.2)
    assert a.path.read_bytes() == b.path.read_bytes()
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    pixels_a = tifffile.imread(a.path)
    pixels_c = tifffile.imread(c.path)
    assert np.abs(pixels_a.astype(int) - pixels_c).mean() > 5
    assert not np.array_equal(a.tissue_mask, c.tissue_mask)


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2, 0.4])
@pytest.mark.parametrize("size", [(8192, 8192), (30_000, 20_000), (40_000, 512)])
def test_lesion_fraction_accurate(fraction, size):
    width, height = size
    fields = synth.build_fields(width, height, MPP, seed=7, lesion_fraction=fraction)
    tissue, lesion = fields.tissue_mask, fields.lesion_mask
    assert tissue.shape == synth.mask_shape(width, height)
    assert 0.1 < tissue.mean() < 0.9
    assert not (lesion & ~tissue).any()
    assert lesion.sum() / tissue.sum() == pytest.approx(fraction, rel=0.1)


def test_lesion_is_compact_blobs():
    fields = synth.build_fields(16_384, 16_384, MPP, seed=2, lesion_fraction=0.05)
    labels, n = ndimage.label(fields.lesion_mask)
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.max() / sizes.sum() > 0.3                  # a few big blobs, not confetti
    assert (sizes >= 10).sum() <= 6


def test_lesion_looks_different_from_normal_tissue(positive):
    """Lesion pixels are darker and more haematoxylin-blue than the rest of the tissue."""
    assert positive.lesion_fraction == pytest.approx(0.1, rel=0.1)
    with tifffile.TiffFile(positive.path) as tif:
        level0 = tif.pages[0].asarray().astype(np.float32)
    cells = _block_mean(level0, synth.MASK_DOWNSAMPLE)      # one colour per mask pixel
    h, w = cells.shape[:2]
    lesion = positive.lesion_mask[:h, :w]
    normal = positive.tissue_mask[:h, :w] & ~lesion & ~positive.pen_mask[:h, :w]
    lesion = ndimage.binary_erosion(lesion, iterations=1)  # away from the soft edges
    normal = ndimage.binary_erosion(normal, iterations=1)
    assert lesion.sum() > 10 and normal.sum() > 100
    les, nor = cells[lesion], cells[normal]
    assert les.mean() < nor.mean() - 25                     # darker
    assert (les[:, 2] - les[:, 0]).mean() > (nor[:, 2] - nor[:, 0]).mean() + 15   # bluer
    # and the separation holds per 64 µm patch, not just on average
    assert np.percentile(les.mean(axis=1), 95) < np.percentile(nor.mean(axis=1), 5)


def test_pen_marks_are_ink_coloured(positive):
    pen = positive.pen_mask
    assert pen.any()
    with tifffile.TiffFile(positive.path) as tif:
        level1 = tif.pages[1].asarray().astype(np.float32)
    cells = _block_mean(level1, synth.MASK_DOWNSAMPLE // 4)
    h, w = cells.shape[:2]
    inked = cells[pen[:h, :w] & ~positive.tissue_mask[:h, :w]]
    glass = cells[~pen[:h, :w] & ~positive.tissue_mask[:h, :w]]
    assert inked.size and glass.size
    assert glass.mean(axis=1).mean() > 225
    assert inked.mean() < glass.mean() - 40


def test_negative_slide_has_no_lesion(tmp_path):
    truth = synth.write_synthetic_slide(tmp_path / "neg.tif", 1024, 1024, seed=5, lesion_fraction=0.0)
    assert truth.label == 0 and truth.lesion_fraction == 0.0
    assert not truth.lesion_mask.any() and truth.tissue_mask.any()
    synth.write_masks(truth)
    assert not synth.read_lesion_mask(truth.path).any()
    np.testing.assert_array_equal(synth.read_tissue_mask(truth.path), truth.tissue_mask)


def test_cohort_files_and_labels(tmp_path):
    spec = synth.CohortSpec(n_slides=4, width=1024, height=900, lesion_fraction=0.15, seed=21)
    table = synth.write_cohort(tmp_path, spec)
    on_disk = pd.read_csv(tmp_path / "labels.csv")
    assert list(on_disk.columns) == ["slide_id", "label", "lesion_fraction"]
    assert list(on_disk.slide_id) == ["synth_000", "synth_001", "synth_002", "synth_003"]
    assert on_disk.label.sum() == 2
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)
    for row in on_disk.itertuples():
        lesion = synth.read_lesion_mask(tmp_path / f"{row.slide_id}.tif")
        tissue = synth.read_tissue_mask(tmp_path / f"{row.slide_id}_tissue.png")
        assert lesion.shape == tissue.shape == synth.mask_shape(1024, 900)
        assert row.lesion_fraction == pytest.approx(lesion.sum() / tissue.sum())
        assert (row.label == 1) == lesion.any()
        if row.label:
            assert row.lesion_fraction == pytest.approx(0.15, rel=0.1)
    # the assignment is from the seed, not the order of calls
    assert list(synth.cohort_assignment(4, 0.5, 21)) == list(on_disk.label)
    assert synth.cohort_assignment(10, 0.3, 1).sum() == 3


def test_cli_synth(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path), "--slides", "2", "--width", "700",
                                       "--height", "600", "--lesion-fraction", "0.2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "labels.csv")
    assert sorted(table.label) == [0, 1]
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "x"), "--slides", "1", "--width", "300",
                                    "--height", "300", "--texture", "paint"])
    assert bad.exit_code == 2 and "unknown texture" in bad.output
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "y"), "--slides", "1", "--width", "300",
                                    "--height", "300", "--stain-jitter", "1.5"])
    assert bad.exit_code == 2 and "Invalid value for '--stain-jitter': 1.5 is not in the range 0<=x<1" in bad.output


@pytest.mark.slow
def test_long_strip_streams_in_bounded_memory(tmp_path):
    """40,000 x 512: level 0 alone would be 61 MB of pixels; tiles are streamed instead."""
    synth.write_synthetic_slide(tmp_path / "warm.tif", 300, 300)     # imports outside the trace
    tracemalloc.start()
    truth = synth.write_synthetic_slide(tmp_path / "strip.tif", 40_000, 512, seed=1, lesion_fraction=0.05)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 45e6                                      # level 0 alone is 61 MB
    with tifffile.TiffFile(truth.path) as tif:
        assert [p.shape[:2] for p in tif.pages] == [(h, w) for w, h in synth.level_dimensions(40_000, 512)]
        level0 = tif.pages[0].asarray()
    last = (np.nonzero(truth.tissue_mask.any(axis=0))[0].max() - 2) * synth.MASK_DOWNSAMPLE
    assert last > 30_000
    assert level0[:, last - 1000:last].min() < 200          # tissue drawn up to the far end


def test_tiles_texture_from_kather(tmp_path):
    tiles = shared_path("tiles", "kather2016_samples")
    truth = synth.write_synthetic_slide(tmp_path / "k.tif", 2048, 1536, seed=2, lesion_fraction=0.1,
                                        texture=f"tiles:{tiles}")
    assert truth.lesion_fraction == pytest.approx(0.1, rel=0.1)
    with tifffile.TiffFile(truth.path) as tif:
        assert len(tif.pages) == 2                          # 2048 and 512 px wide
        level0 = tif.pages[0].asarray().astype(np.float32)
    cells = _block_mean(level0, synth.MASK_DOWNSAMPLE)
    h, w = cells.shape[:2]
    tissue = truth.tissue_mask[:h, :w]
    assert cells[~tissue].mean() > 230                      # glass stays glass
    assert cells[tissue].mean() < 215                       # tissue is stained
    # lesion pixels come from the tumour tiles: compare with a tumour tile's colour
    tumour = np.mean([np.asarray(Image.open(p).convert("RGB"), np.float32).mean(axis=(0, 1))
                      for p in sorted((tiles / "01_TUMOR").iterdir())], axis=0)
    core = ndimage.binary_erosion(truth.lesion_mask[:h, :w], iterations=2)
    assert core.any()
    assert np.abs(cells[core].mean(axis=0) - tumour).max() < 30


def test_tiles_texture_errors(tmp_path):
    tiles = shared_path("tiles", "kather2016_samples")
    with pytest.raises(NicError, match="no lesion tiles"):
        synth.write_synthetic_slide(tmp_path / "x.tif", 600, 600, lesion_fraction=0.1,
                                    texture=f"tiles:{tiles}", lesion_classes=("nothing",))
    with pytest.raises(NicError, match="not found"):
        synth.write_synthetic_slide(tmp_path / "y.tif", 600, 600, texture=f"tiles:{tmp_path / 'missing'}")


def test_lesion_class_guess():
    assert _is_lesion("01_TUMOR", None) and _is_lesion("lung_aca", None)
    assert _is_lesion("lung_scc", None) and not _is_lesion("lung_n", None)
    assert not _is_lesion("02_STROMA", None) and _is_background("08_EMPTY")
    assert _guess_tile_mpp("/data/tiles/kather2016_samples") == 0.495
    assert _guess_tile_mpp("/data/lc25000_lung/labels.csv") == 1.7
    assert _is_lesion("metastasis", None) and not _is_lesion("normal", None)
    assert _guess_tile_mpp("/data/pcam/labels.csv") == 0.972


@pytest.mark.slow
def test_pcam_tiles_come_from_the_train_split_at_their_true_scale():
    """PCam: 96 px at 0.972 µm/px are 187 px at 0.5 µm/px; validation patches never reach a slide."""
    pcam = shared_path("pcam")
    entries = list_tiles(pcam, pcam / "labels.csv")
    table = pd.read_csv(pcam / "labels.csv")
    assert len(entries) == (table["split"] == "train").sum() > 0
    assert all("/train/" in str(path) for path, _ in entries)
    roles = _roles(entries, None, pcam, need_lesion=True)
    labels = dict(entries)
    assert {labels[p] for p in roles["lesion"]} == {"metastasis"} and {labels[p] for p in roles["normal"]} == {"normal"}
    pools = TilePools(pcam, pcam / "labels.csv", None, None, 0.5, seed=1, need_lesion=True)
    assert pools.tile_mpp == 0.972 and pools.size0 == 187
    for role in ("normal", "lesion"):  # many distinct tiles per slide, not a few repeated ones
        assert len(pools.images[role][1]) == MAX_POOL and pools.images[role][1][0].shape == (187, 187, 3)
        assert pools.images[role][4][0].shape == (47, 47, 3)


def test_a_tile_csv_without_train_rows_is_refused(tmp_path):
    tile = sorted(shared_path("tiles", "kather2016_samples", "02_STROMA").iterdir())[0]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label,split\n{tile},stroma,valid\n")
    with pytest.raises(NicError, match="no rows with split 'train'"):
        list_tiles(tmp_path, labels)


def test_tile_split_valid_draws_only_the_held_out_rows(tmp_path):
    """--tile-split valid: slides for an encoder trained on the train rows show none of them."""
    tiles = sorted(shared_path("tiles", "kather2016_samples", "02_STROMA").iterdir())[:3]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\n" + "".join(
        f"{t},stroma,{split}\n" for t, split in zip(tiles, ("train", "valid", "valid"))))
    assert [p for p, _ in list_tiles(tmp_path, labels, "valid")] == tiles[1:]
    assert [p for p, _ in list_tiles(tmp_path, labels)] == tiles[:1]
    with pytest.raises(NicError, match="no rows with split 'test' \\(it has train, valid\\)"):
        list_tiles(tmp_path, labels, "test")


@pytest.mark.slow
def test_pcam_haystack_cohort_from_the_cli(tmp_path):
    """`nic synth --texture tiles:pcam --tile-labels labels.csv`: a lymph-node cohort with metastases."""
    pcam = shared_path("pcam")
    out = tmp_path / "hay"
    result = CliRunner().invoke(main, ["synth", str(out), "--slides", "2", "--width", "1536", "--height", "1536",
                                       "--lesion-fraction", "0.1", "--texture", f"tiles:{pcam}",
                                       "--tile-labels", str(pcam / "labels.csv"), "--tile-split", "valid"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "synth.json").read_text())["spec"]["tile_split"] == "valid"
    labels = pd.read_csv(out / "labels.csv")
    assert labels["label"].tolist().count(1) == 1
    assert labels.loc[labels["label"] == 1, "lesion_fraction"].item() == pytest.approx(0.1, rel=0.15)
    level0 = tifffile.imread(out / "synth_000.tif")
    assert level0.shape == (1536, 1536, 3) and level0.std() > 20  # real texture, not a flat fill


@pytest.mark.slow
def test_tiles_texture_from_labels_csv(tmp_path):
    """LC25000 lung: lung_aca/lung_scc guessed as lesion, tiles at 1.7 µm/px upscaled."""
    labels = shared_path("lc25000_lung", "labels.csv")
    truth = synth.write_synthetic_slide(tmp_path / "lung.tif", 1600, 1200, seed=8, lesion_fraction=0.2,
                                        texture="tiles", tile_labels=labels)
    assert truth.lesion_fraction == pytest.approx(0.2, rel=0.1)
    level0 = tifffile.imread(truth.path).astype(np.float32)
    cells = _block_mean(level0, synth.MASK_DOWNSAMPLE)
    h, w = cells.shape[:2]
    assert cells[truth.tissue_mask[:h, :w]].mean() < cells[~truth.tissue_mask[:h, :w]].mean() - 20


# ---------------------------------------------------------------------------- stain jitter


def _tissue_colours(cohort_dir, n_slides):
    """Mean level-1 RGB of each slide's tissue (eroded away from the edges)."""
    colours = []
    for i in range(n_slides):
        path = cohort_dir / f"synth_{i:03d}.tif"
        with tifffile.TiffFile(path) as tif:
            level1 = tif.pages[1].asarray().astype(np.float32)
        cells = _block_mean(level1, synth.MASK_DOWNSAMPLE // 4)
        h, w = cells.shape[:2]
        tissue = ndimage.binary_erosion(synth.read_tissue_mask(path), iterations=2)[:h, :w]
        colours.append(cells[tissue].mean(axis=0))
    return np.array(colours)


def test_stain_jitter_varies_stain_between_slides_only_when_on(tmp_path):
    """One real tile as the only texture: slides differ in colour only through their stain."""
    tile = sorted(shared_path("tiles", "kather2016_samples", "02_STROMA").iterdir())[0]
    (tmp_path / "tiles" / "stroma").mkdir(parents=True)
    shutil.copy(tile, tmp_path / "tiles" / "stroma" / tile.name)
    colours = {}
    for jitter in (0.0, 0.2):
        out = tmp_path / f"jitter{jitter}"
        synth.write_cohort(out, synth.CohortSpec(n_slides=2, width=1024, height=1024, positive_fraction=0.0,
                                                 texture=f"tiles:{tmp_path / 'tiles'}", stain_jitter=jitter))
        colours[jitter] = _tissue_colours(out, 2)
        np.testing.assert_array_equal(synth.read_tissue_mask(out / "synth_001.tif"),
                                      synth.read_tissue_mask(tmp_path / "jitter0.0" / "synth_001.tif"))
    assert np.abs(colours[0.0][0] - colours[0.0][1]).max() < 1.5
    assert np.abs(colours[0.2][0] - colours[0.2][1]).max() > 5


def test_stain_jitter_recolours_procedural_slides_from_the_seed(tmp_path):
    plain = synth.write_synthetic_slide(tmp_path / "a.tif", 1024, 1024, seed=3)
    jittered = synth.write_synthetic_slide(tmp_path / "b.tif", 1024, 1024, seed=3, stain_jitter=0.3)
    again = synth.write_synthetic_slide(tmp_path / "c.tif", 1024, 1024, seed=3, stain_jitter=0.3)
    np.testing.assert_array_equal(plain.tissue_mask, jittered.tissue_mask)
    assert jittered.path.read_bytes() == again.path.read_bytes()
    a, b = tifffile.imread(plain.path).astype(np.float32), tifffile.imread(jittered.path).astype(np.float32)
    tissue = np.kron(plain.tissue_mask, np.ones((32, 32), bool))[:1024, :1024]
    assert np.abs(a[~tissue] - b[~tissue]).mean() < 1                  # glass keeps its colour
    # tissue optical density per channel changes by a mix of that channel's H and E factors
    od_a, od_b = (-np.log(np.maximum(x[tissue], 1) / 255).mean(axis=0) for x in (a, b))
    ratio = od_b / od_a
    scales = stain_scales(3, 0.3)
    low, high = np.minimum(1, scales.min(axis=0)), np.maximum(1, scales.max(axis=0))
    assert ((ratio > low - 0.01) & (ratio < high + 0.01)).all(), (ratio, scales)
    assert np.abs(ratio - 1).max() > 0.04
    with pytest.raises(NicError, match="stain jitter"):
        synth.write_synthetic_slide(tmp_path / "d.tif", 300, 300, stain_jitter=1.5)


def test_restain_without_jitter_is_the_identity():
    np.testing.assert_array_equal(stain_scales(7, 0.0), np.ones((2, 3)))
    np.testing.assert_allclose(restain_matrix(stain_scales(7, 0.0)), np.eye(3), atol=1e-6)
    rgb = np.random.default_rng(0).uniform(20, 250, (8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(restain(rgb, restain_matrix(np.ones((2, 3)))), rgb, rtol=1e-4)
    scales = stain_scales(7, 0.2)
    assert ((scales >= 0.8) & (scales <= 1.2)).all() and not np.allclose(scales, 1)
    np.testing.assert_array_equal(scales, stain_scales(7, 0.2))
