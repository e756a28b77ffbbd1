"""The compression grid: cell counts, level-0 origins, µm coordinates, chunk-aligned blocks."""

import numpy as np

from nic_pipeline.compress.grid import Grid, block_grid_shape, iter_blocks


def test_native_resolution_grid_keeps_only_whole_patches():
    grid = Grid(width=1000, height=520, slide_mpp=0.5, mpp=0.5, patch_size=128, stride=128)
    assert grid.shape == (4, 7)  # 520 // 128, 1000 // 128
    x, y = grid.cell_origin_px(np.array([0, 3]), np.array([0, 6]))
    assert x.tolist() == [0, 768] and y.tolist() == [0, 384]


def test_a_40x_scan_maps_each_cell_to_twice_the_level0_pixels():
    grid = Grid(width=4096, height=2048, slide_mpp=0.25, mpp=0.5, patch_size=128, stride=128)
    assert grid.scale == 2.0
    assert grid.shape == (8, 16)
    x, _ = grid.cell_origin_px(np.array([0]), np.array([1]))
    assert x.tolist() == [256]


def test_coordinates_are_cell_centres_in_micrometres():
    grid = Grid(width=512, height=256, slide_mpp=0.5, mpp=0.5, patch_size=128, stride=128)
    y, x = grid.coords_um()
    assert x.tolist() == [32.0, 96.0, 160.0, 224.0]
    assert y.tolist() == [32.0, 96.0]


def test_overlapping_patches_and_a_slide_smaller_than_a_patch():
    assert Grid(600, 600, 0.5, 0.5, patch_size=224, stride=112).shape == (4, 4)
    assert Grid(100, 100, 0.5, 0.5, patch_size=128, stride=128).shape == (0, 0)


def test_blocks_tile_the_grid_exactly_once_and_clip_at_the_edge():
    shape = (70, 33)
    blocks = list(iter_blocks(shape, 32))
    assert block_grid_shape(shape, 32) == (3, 2) and len(blocks) == 6
    covered = np.zeros(shape, int)
    for block in blocks:
        covered[block.slices] += 1
        assert block.y0 % 32 == 0 and block.x0 % 32 == 0  # aligned with the Zarr chunks
    assert (covered == 1).all()
    assert blocks[-1].shape == (6, 1)
