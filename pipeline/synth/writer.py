"""Pyramidal tiled-JPEG TIFFs with an Aperio-style description, which OpenSlide and cuCIM read.

Each level is its own IFD (downsamples 1, 4, 16, ...), streamed tile by tile from a renderer by
a few threads, so no level is ever held in memory. Levels coarser than 4 are rendered at 4 and
box-averaged, so fine texture is anti-aliased.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

from nic_pipeline.runtime.progress import progress_bar
from nic_pipeline.synth.render import Renderer

TILE = 256
MIN_LEVEL_SIZE = 512          # add pyramid levels (factor 4) until the longest side is <= this
LEVEL_FACTOR = 4


def pyramid_downsamples(width: int, height: int) -> list[int]:
    """Downsamples 1, 4, 16, ... until the level's longest side is <= MIN_LEVEL_SIZE px."""
    downs = [1]
    while max(width, height) / downs[-1] > MIN_LEVEL_SIZE:
        downs.append(downs[-1] * LEVEL_FACTOR)
    return downs


def level_dimensions(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every pyramid level (ceil division, so levels cover the slide)."""
    return [(-(-width // d), -(-height // d)) for d in pyramid_downsamples(width, height)]


def aperio_description(width: int, height: int, mpp: float, quality: int = 90) -> str:
    """The ImageDescription that makes OpenSlide and cuCIM treat the file as Aperio SVS."""
    return (f"Aperio Image Library v12.0.0 \n{width}x{height} [0,0 {width}x{height}] "
            f"({TILE}x{TILE}) JPEG Q={quality}|AppMag = 20|MPP = {mpp}")


def _render_tile(renderer: Renderer, d: int, lw: int, lh: int, ty: int, tx: int) -> np.ndarray:
    """One (256, 256, 3) tile of the level with downsample d; only its part inside the level is drawn.

    Levels coarser than 4 are rendered at downsample 4 and box-averaged, in blocks of
    256 x 256 render px (cache-sized), so fine texture is anti-aliased and memory bounded.
    """
    d_r = min(d, LEVEL_FACTOR)
    f = d // d_r
    block = max(1, TILE // f)
    th, tw = min(TILE, lh - ty), min(TILE, lw - tx)
    tile = np.zeros((TILE, TILE, 3), np.uint8)
    if f == 1:
        tile[:th, :tw] = renderer.render(ty, tx, th, tw, d)
        return tile
    for by in range(0, th, block):
        for bx in range(0, tw, block):
            bh, bw = min(block, th - by), min(block, tw - bx)
            big = renderer.render((ty + by) * f, (tx + bx) * f, bh * f, bw * f, d_r)
            small = big.reshape(bh, f, bw, f, 3).mean(axis=(1, 3))
            tile[by:by + bh, bx:bx + bw] = np.clip(small + 0.5, 0, 255).astype(np.uint8)
    return tile


def _level_tiles(renderer: Renderer, d: int, lw: int, lh: int, workers: int = 1):
    """Yield the tiles of one level in row-major order, rendered by `workers` threads.

    At most 2 x workers tiles are in flight, so memory does not grow with the slide.
    """
    coords = ((ty, tx) for ty in range(0, lh, TILE) for tx in range(0, lw, TILE))
    if workers <= 1:
        for ty, tx in coords:
            yield _render_tile(renderer, d, lw, lh, ty, tx)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for ty, tx in coords:
            pending.append(pool.submit(_render_tile, renderer, d, lw, lh, ty, tx))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _counted(tiles, bar):
    """Pass tiles through, ticking the progress bar once per tile."""
    for tile in tiles:
        bar.update(1)
        yield tile


def write_pyramid(path: Path, renderer: Renderer, quality: int, progress: bool, workers: int = 1):
    """Stream every level into its own tiled-JPEG IFD; return the level dimensions."""
    width, height, mpp = renderer.width, renderer.height, renderer.mpp
    dims = level_dimensions(width, height)
    downs = pyramid_downsamples(width, height)
    n_tiles = sum(-(-w // TILE) * -(-h // TILE) for w, h in dims)
    with progress_bar(total=n_tiles, unit="tile", desc=path.name, leave=False, disable=not progress) as bar, \
            tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**32 - 2**28) as tw:
        for level, ((lw, lh), d) in enumerate(zip(dims, downs)):
            res = 1e4 / (mpp * d)                       # px per cm
            tw.write(
                _counted(_level_tiles(renderer, d, lw, lh, workers), bar),
                shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE),
                photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                description=aperio_description(width, height, mpp, quality) if level == 0 else None,
                resolution=(res, res), resolutionunit="CENTIMETER", metadata=None,
                subfiletype=0, maxworkers=1,
            )
    return dims
