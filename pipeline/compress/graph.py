"""The compression task graph: slides in, one Zarr group of codes per slide out.

Per slide, three kinds of task, named so the dashboard's task stream reads like the pipeline:

``detect-tissue-<slide>``
    open the slide, check its µm/px, find the tissue on a low-resolution level, lay the grid,
    create the slide's group (tissue fractions, coordinates) and list the blocks still to do;
``encode-block-<slide>-<by>-<bx>``
    read the block's tissue cells, encode them, write the block's chunks (one per block);
``finalize-slide-<slide>``
    check that every block is written and mark the slide complete.

Tasks return only small metadata; pixels and codes stay on the workers and in the store.
Completed slides and written blocks are skipped on rerun, so an interrupted job, run again,
finishes with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.compress.encode import EncoderPlugin, EncoderSettings, encode_block
from pipeline.runtime.device import resolve_precision
from pipeline.errors import NicError, SlideError
from pipeline.compress.grid import Grid, iter_blocks
from pipeline.io import find_slides, open_slide, read_mpp_csv
from pipeline.compress.store import (
    COMPLETE,
    CompressionConfig,
    create_slide,
    done_blocks,
    mark_complete,
    open_store,
    slide_status,
    source_fingerprint,
    write_block,
)


@dataclass(frozen=True)
class SlideJob:
    """One slide to compress: its file, id and µm/px override (None: from the metadata)."""

    path: str
    slide_id: str
    mpp: float | None = None


@dataclass
class SlideResult:
    """What happened to one slide in a run."""

    slide_id: str
    path: str
    status: str = "pending"  # complete | skipped (already complete) | failed
    error: str | None = None
    patches: int = 0
    blocks_encoded: int = 0
    blocks_skipped: int = 0
    tissue_cells: int = 0


@dataclass
class CompressReport:
    store: str
    slides: list[SlideResult] = field(default_factory=list)

    @property
    def failed(self) -> list[SlideResult]:
        return [s for s in self.slides if s.status == "failed"]

    @property
    def patches(self) -> int:
        return sum(s.patches for s in self.slides)

    @property
    def blocks_encoded(self) -> int:
        return sum(s.blocks_encoded for s in self.slides)


def plan_jobs(paths, mpp: float | None = None, mpp_csv: str | None = None) -> list[SlideJob]:
    """The slides under ``paths`` with their ids and µm/px overrides (CSV beats the flag)."""
    per_slide = read_mpp_csv(mpp_csv) if mpp_csv else {}
    jobs, seen = [], {}
    for path in find_slides(paths):
        slide_id = path.stem
        if slide_id in seen:
            raise NicError(f"two slides share the id {slide_id!r}: {seen[slide_id]} and {path}; rename one")
        seen[slide_id] = path
        jobs.append(SlideJob(str(path.resolve()), slide_id, per_slide.get(slide_id, mpp)))
    return jobs


def compression_config(settings: EncoderSettings, block: int, min_tissue: float, mask_mpp: float) -> CompressionConfig:
    """The store settings for an encoder: its grid, code size and the hash of its weights."""
    from models.registry import get_spec, weights_sha256

    spec = get_spec(settings.name)  # the spec and the weights' hash: no network is built here
    return CompressionConfig(
        encoder=spec.name,
        encoder_sha256=weights_sha256(settings.name, settings.weights, settings.random_init, settings.seed),
        code_dim=spec.code_dim,
        mpp=spec.mpp,
        patch_size=spec.patch_size,
        stride=spec.stride,
        block=block,
        min_tissue=min_tissue,
        mask_mpp=mask_mpp,
        precision=settings.precision,
        dihedral_mean=settings.dihedral_mean,
    )


def expected_errors_as_results(task):
    """Return a :class:`SlideError` as ``{"error": reason}``: a bad slide is a result to report,
    not a crash to log with a traceback on the worker."""

    @functools.wraps(task)
    def run(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except SlideError as err:
            return {"error": err.reason}

    return run


@expected_errors_as_results
def detect_tissue(store: str, job: SlideJob, config: CompressionConfig) -> dict:
    """Task: tissue mask, grid and slide group; returns the grid and the blocks still to encode."""
    import zarr

    from pipeline.compress.grid import cell_coverage
    from pipeline.compress.tissue import slide_tissue_mask

    with open_slide(job.path, mpp=job.mpp) as slide:
        grid = Grid(*slide.dimensions, slide.require_mpp(), config.mpp, config.patch_size, config.stride)
        if 0 in grid.shape:
            raise SlideError(job.path, f"smaller than one {config.patch_size} px patch at {config.mpp} µm/px")
        mask, mask_mpp = slide_tissue_mask(slide, mask_mpp=config.mask_mpp)
    tissue = np.asarray(cell_coverage(mask, mask_mpp, grid.cell_um, grid.shape))
    tissue_cells = int((tissue >= config.min_tissue).sum())
    if not tissue_cells:
        raise SlideError(job.path, f"no grid cell has {config.min_tissue:.0%} tissue; nothing to encode")
    root = zarr.open_group(store, mode="a", zarr_format=3)
    group = create_slide(root, job.slide_id, grid, config, tissue, source_fingerprint(job.path))
    done = done_blocks(group)
    todo, skipped = [], 0
    for block in iter_blocks(grid.shape, config.block):
        cells = int((tissue[block.slices] >= config.min_tissue).sum())
        if done[block.index]:
            skipped += 1
        elif cells:
            todo.append((block, cells))
        else:
            write_block(group, block, None)  # background only: nothing to encode, no chunk
    return {"grid": grid, "todo": todo, "blocks_skipped": skipped, "tissue_cells": tissue_cells}


encode_block_task = expected_errors_as_results(encode_block)


def finalize_slide(store: str, slide_id: str, *block_results: dict) -> dict:
    """Task: mark the slide complete once all its blocks are written without error."""
    import zarr

    errors = [r["error"] for r in block_results if "error" in r]
    if errors:
        return {"error": errors[0]}
    mark_complete(zarr.open_group(store, path=slide_id, mode="r+", zarr_format=3))
    return {"patches": sum(r["patches"] for r in block_results)}


def compress(
    jobs: list[SlideJob],
    store: str | os.PathLike,
    client,
    settings: EncoderSettings = EncoderSettings(),
    block: int = 32,
    min_tissue: float = 0.1,
    mask_mpp: float = 8.0,
    progress: bool = True,
) -> CompressReport:
    """Compress ``jobs`` into ``store`` on the cluster behind ``client``."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    from pipeline.runtime.cluster import gpu_resources

    store = str(Path(store).resolve())
    gpu = gpu_resources(client)
    settings = _with_cluster_precision(settings, gpu is not None)
    config = compression_config(settings, block, min_tissue, mask_mpp)
    root = open_store(store, config)
    report = CompressReport(store)
    results = {job.slide_id: SlideResult(job.slide_id, job.path) for job in jobs}
    report.slides = list(results.values())
    todo_jobs = []
    for job in jobs:
        if slide_status(root, job.slide_id) == COMPLETE:
            results[job.slide_id].status = "skipped"
        else:
            todo_jobs.append(job)
    if not todo_jobs:
        return report

    client.register_plugin(EncoderPlugin(settings), name=settings.plugin_name)
    role = {}
    pending = as_completed()
    for job in todo_jobs:
        future = client.submit(detect_tissue, store, job, config, key=f"detect-tissue-{job.slide_id}", pure=False)
        role[future.key] = ("detect", job)
        pending.add(future)

    slides_bar = tqdm(total=len(todo_jobs), desc="slides", unit="slide", disable=not progress, position=0)
    patches_bar = tqdm(total=0, desc="patches", unit="patch", disable=not progress, position=1)
    with slides_bar, patches_bar:
        for future in pending:
            kind, job = role.pop(future.key)
            result = results[job.slide_id]
            if future.status == "error":  # a bug, not bad input: keep the exception type
                err = future.exception()
                value = {"error": f"{type(err).__name__}: {err}"}
            else:
                value = future.result()
            if "error" in value:
                if result.status != "failed":
                    result.status, result.error = "failed", value["error"]
                    slides_bar.update(1)
                continue
            if kind == "detect":
                result.tissue_cells = value["tissue_cells"]
                result.blocks_skipped = value["blocks_skipped"]
                patches_bar.total += sum(n for _, n in value["todo"])
                patches_bar.refresh()
                block_futures = []
                for blk, _ in value["todo"]:
                    by, bx = blk.index
                    f = client.submit(
                        encode_block_task, store, job.path, job.slide_id, job.mpp, value["grid"], blk, config, settings,
                        key=f"encode-block-{job.slide_id}-{by}-{bx}", resources=gpu, pure=False,
                    )
                    role[f.key] = ("block", job)
                    block_futures.append(f)
                    pending.add(f)
                final = client.submit(finalize_slide, store, job.slide_id, *block_futures,
                                      key=f"finalize-slide-{job.slide_id}", pure=False)
                role[final.key] = ("finalize", job)
                pending.add(final)
            elif kind == "block":
                result.blocks_encoded += 1
                result.patches += value["patches"]
                patches_bar.update(value["patches"])
            else:
                result.status = "complete"
                slides_bar.update(1)
    return report


def _with_cluster_precision(settings: EncoderSettings, gpu: bool) -> EncoderSettings:
    """Resolve ``auto`` precision once for the whole cluster, so the store records what ran."""
    from dataclasses import replace

    if settings.precision != "auto":
        return settings
    return replace(settings, precision="fp16" if gpu else resolve_precision("auto", "cpu"))
