"""Worker-side reading and encoding: the patches gathered from block reads are the slide's pixels."""

import numpy as np
import pytest

from nic_pipeline.compress.codes import default_batch_size, encode_patches
from nic_pipeline.compress.encode import BAND_PX, EncoderSettings, NicWorker, read_cells
from nic_pipeline.compress.grid import Grid, iter_blocks
from nic_pipeline.io import open_slide

from tests.conftest import shared_path


@pytest.mark.parametrize("patch, stride", [(128, 128), (224, 112), (96, 128)])
def test_gathered_cells_are_the_slide_pixels(patch, stride):
    with open_slide(shared_path("slides", "CMU-1-Small-Region.svs"), mpp=0.5) as slide:
        grid = Grid(*slide.dimensions, 0.5, 0.5, patch, stride)
        block = next(iter(iter_blocks(grid.shape, 8)))
        rng = np.random.default_rng(0)
        cells = np.flatnonzero(rng.random(block.shape[0] * block.shape[1]) < 0.4)
        rows, cols = np.unravel_index(cells, block.shape)  # row-major, as np.nonzero gives them
        patches = read_cells(slide, grid, block, rows, cols)
        assert patches.shape == (len(rows), patch, patch, 3)
        for k in (0, len(rows) // 2, len(rows) - 1):
            x, y = grid.cell_origin_px(np.array([block.y0 + rows[k]]), np.array([block.x0 + cols[k]]))
            np.testing.assert_array_equal(patches[k], slide.read_region((int(x[0]), int(y[0])), (patch, patch)))


def test_a_tall_block_is_read_in_bands_and_keeps_the_cell_order():
    assert BAND_PX // 128 < 16  # a 16-row block needs several bands
    with open_slide(shared_path("slides", "CMU-1-Small-Region.svs"), mpp=0.5) as slide:
        grid = Grid(*slide.dimensions, 0.5, 0.5, 128, 128)
        block = next(iter(iter_blocks(grid.shape, 16)))
        rows, cols = np.nonzero(np.ones(block.shape, bool))
        patches = read_cells(slide, grid, block, rows, cols)
        whole = slide.read_region((0, 0), (block.shape[1] * 128, block.shape[0] * 128))
        expected = whole.reshape(block.shape[0], 128, block.shape[1], 128, 3).swapaxes(1, 2).reshape(-1, 128, 128, 3)
        np.testing.assert_array_equal(patches, expected)


def test_plugin_encodes_like_the_encoder_and_sizes_batches_by_patch_area():
    assert default_batch_size(128) == 256 and default_batch_size(224) == 80
    state = NicWorker()
    encoder = state.encoder(EncoderSettings(precision="fp32", device="cpu"))
    assert state.encoder(EncoderSettings(precision="fp32", device="cpu")) is encoder  # loaded once per worker
    patches = np.random.default_rng(1).integers(0, 256, (300, 128, 128, 3), dtype=np.uint8)
    codes = encoder.encode(patches)
    assert codes.shape == (300, 128) and codes.dtype == np.float16
    np.testing.assert_allclose(codes, encode_patches(encoder.module, patches, "fp32", 64), rtol=1e-3, atol=1e-3)
    for seed in (1, 2):  # at most two encoders stay loaded
        state.encoder(EncoderSettings(random_init=True, seed=seed, precision="fp32", device="cpu"))
    assert len(state._encoders) == 2 and encoder not in state._encoders.values()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nic_embed_and_compress_give_a_patch_the_same_code(tmp_path, precision):
    """One encoder runner: `nic embed` on a tile and a compression worker on the same patch give
    the same code at the same precision (embed ran its own fp32 loop, compress autocast)."""
    from click.testing import CliRunner
    from PIL import Image

    from nic_pipeline.cli import main
    from nic_pipeline.encoder.tiles import read_rgb

    rng = np.random.default_rng(3)
    patches = rng.integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)
    for i, patch in enumerate(patches):
        Image.fromarray(patch).save(tmp_path / f"tile_{i}.png")
    assert np.array_equal(read_rgb(tmp_path / "tile_0.png"), patches[0])  # lossless: the same pixels
    result = CliRunner().invoke(main, ["embed", str(tmp_path), "--out", str(tmp_path / "codes.npz"),
                                       "--precision", precision])
    assert result.exit_code == 0, result.output
    embedded = np.load(tmp_path / "codes.npz")["features"]
    worker = NicWorker().encoder(EncoderSettings(precision=precision, device="cpu"))
    assert worker.precision == precision
    compressed = worker.encode(patches).astype(np.float32)
    np.testing.assert_allclose(embedded, compressed, rtol=0, atol=2e-3 * np.abs(compressed).max())
    if precision == "bf16":  # the tolerance tells the precisions apart
        fp32 = NicWorker().encoder(EncoderSettings(precision="fp32", device="cpu")).encode(patches)
        assert np.abs(embedded - fp32).max() > 2e-3 * np.abs(compressed).max()
