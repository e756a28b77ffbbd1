"""The parts of benchmarks/gpu.py that run in a fresh process each: cuCIM picks its decoder (CPU,
nvJPEG or nvImageCodec) once per process, so the CPU and GPU readers are measured apart; and the
slides are synthesized in the background while the tests run.

    python benchmarks/gpu_probes.py KIND JSON-ARGUMENTS    # prints one line of JSON
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nic_pipeline.compress.encode import iter_bands  # noqa: E402
from nic_pipeline.compress.grid import Grid, cell_coverage  # noqa: E402
from nic_pipeline.compress.store import blocks_with_tissue  # noqa: E402
from nic_pipeline.compress.tissue import slide_tissue_mask  # noqa: E402
from nic_pipeline.io import open_slide  # noqa: E402
from nic_pipeline.runtime.arrays import to_numpy  # noqa: E402
from nic_pipeline.runtime.device import usable_cpus  # noqa: E402
from nic_pipeline.synth import write_synthetic_slide  # noqa: E402

MPP = 0.25  # a 40x scan
NIC_PATCH = 128  # NIC grid: 128 px cells at 0.5 µm/px
MIN_TISSUE = 0.1


def nic_grid(opened) -> Grid:
    return Grid(*opened.dimensions, opened.require_mpp(), 0.5, NIC_PATCH, NIC_PATCH)


def synthesize(slides: list) -> dict:
    """Write the slides (path, width, height), each atomically: a cut run leaves no half file."""
    for path, width, height in slides:
        partial, start = Path(path).with_suffix(".partial.tif"), time.perf_counter()
        write_synthetic_slide(partial, width, height, mpp=MPP, seed=14, workers=usable_cpus())
        partial.replace(path)
        print(f"synthesized {Path(path).name} in {time.perf_counter() - start:.0f} s", flush=True)
    return {}


def probe_tissue(slide: str, device: str, mask_out: str, coverage_out: str | None = None) -> dict:
    """The slide's tissue mask on ``device``, timed twice (the first call compiles GPU kernels)."""
    seconds = []
    for _ in range(2):
        with open_slide(slide, device=device) as opened:
            start = time.perf_counter()
            mask, mask_mpp = slide_tissue_mask(opened)
            seconds.append(time.perf_counter() - start)
            grid = nic_grid(opened)
            decoder = opened.decoder
    np.save(mask_out, mask)
    if coverage_out:
        np.save(coverage_out, cell_coverage(mask, mask_mpp, grid.cell_um, grid.shape))
    cells = grid.shape[0] * grid.shape[1]
    return {"first_s": seconds[0], "seconds": seconds[1], "cells": cells, "rate": cells / seconds[1], "decoder": decoder}


def probe_decode(slide: str, device: str, coverage: str, threads: int, block: int, seconds: float,
                 check_tiles: bool = True) -> dict:
    """Patches/s of reading the tissue cells of the NIC grid as a worker does (bands of a block,
    resampled to 0.5 µm/px, on ``device``), ``threads`` blocks at a time, for about ``seconds``."""
    tissue = np.load(coverage)
    with open_slide(slide, device=device, check_tiles=check_tiles) as opened:
        grid = nic_grid(opened)

        def read(blk, first_band_only=False) -> int:
            rows, cols = np.nonzero(tissue[blk.slices] >= MIN_TISSUE)
            n = 0
            for patches in iter_bands(opened, grid, blk, rows, cols):
                n += len(patches)
                if first_band_only:
                    break
            to_numpy(patches[:1])  # waits for the device
            return n

        blocks = [blk for blk, _ in blocks_with_tissue(tissue, block, MIN_TISSUE)]
        read(blocks[0], first_band_only=True)  # warm-up: decoder handles, kernels
        start, patches = time.perf_counter(), 0
        with ThreadPoolExecutor(threads) as pool:
            running = []
            for blk in blocks:
                running.append(pool.submit(read, blk))
                while len(running) >= threads:
                    patches += running.pop(0).result()
                if time.perf_counter() - start > seconds:
                    break
            patches += sum(f.result() for f in running)
        elapsed = time.perf_counter() - start
        return {"patches": patches, "seconds": elapsed, "rate": patches / elapsed, "decoder": opened.decoder,
                "threads": threads, "block": block, "tile_check": check_tiles}


PROBES = {"synth": synthesize, "tissue": probe_tissue, "decode": probe_decode}

if __name__ == "__main__":
    print(json.dumps(PROBES[sys.argv[1]](**json.loads(sys.argv[2]))), flush=True)
