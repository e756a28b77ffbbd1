"""The compression task graph: slides in, one Zarr group of codes per slide out.

Per slide, three kinds of task, keyed ``(kind, run, slide_id, ...)`` so that the dashboard shows
one row per kind whatever the slide names, and two jobs on one cluster never share a key:

``detect-tissue``
    check a finished slide (source, µm/px, shards) or open the slide, settle its µm/px, find the
    tissue on a low-resolution level, lay the grid, create the slide's group, list blocks to do;
    a slide with one block (or none) left is encoded and finalized in this same task: the
    scheduler spends 2.5-5 ms of CPU per task whatever it does (docs/benchmarks.md, "Scale"),
    and biopsy-sized slides are one block;
``encode-block``
    read the block's tissue cells, encode them, write the block's shard (one file per block);
``finalize-slide``
    check that every block is written, record how each was encoded, mark the slide complete.

The client streams: at most ``window`` slides are in flight, each slide's blocks go in with
one ``client.map``, all under one span per run (the dashboard's metrics), and each finished
slide's index line is appended to the store (:mod:`nic_pipeline.compress.index`). Tasks return
only small metadata; pixels and codes stay on the workers and in the store. Finished slides and
written blocks are skipped on rerun, so an interrupted job, run again, finishes with the same
bytes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import platform
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import zarr
from distributed import as_completed, span

from nic_models.registry import get_spec, weights_sha256
from nic_pipeline.compress.catalog import index_entry
from nic_pipeline.compress.encode import NicWorker, encode_block, warm_encoder
from nic_pipeline.compress.grid import DEFAULT_BLOCK, DEFAULT_MIN_TISSUE, Grid, cell_coverage
from nic_pipeline.compress.index import IndexWriter
from nic_pipeline.compress.jobs import SlideJob, slide_mpp
from nic_pipeline.compress.settings import EncoderSettings
from nic_pipeline.compress.stain_fit import source_stain_attrs, with_stain_target
from nic_pipeline.compress.store import (
    COMPLETE,
    IN_PROGRESS,
    CompressionConfig,
    block_done,
    blocks_with_tissue,
    check_slide,
    create_slide,
    delete_block,
    find_slide_group,
    mark_complete,
    open_slide_group,
    open_store,
    record_failures,
    record_run,
    remove_slide,
    slide_block,
    slide_damage,
    source_changed,
    source_fingerprint,
)
from nic_pipeline.compress.tissue import DEFAULT_MASK_MPP, slide_tissue_mask
from nic_pipeline.errors import NicError, SlideError
from nic_pipeline.io import open_slide
from nic_pipeline.runtime.cluster import gpu_resources
from nic_pipeline.runtime.device import resolve_array_device
from nic_pipeline.runtime.monitor import publish_progress
from nic_pipeline.runtime.preflight import absolute, package_versions
from nic_pipeline.runtime.progress import progress_bar


@dataclass(frozen=True)
class RunOptions:
    """How a run treats what a store already holds."""

    verify: bool = False  # read every shard of finished slides and check its checksums
    redo_changed: bool = False  # compress again slides whose file or µm/px changed


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
    run: str = ""
    slides: list[SlideResult] = field(default_factory=list)
    seconds: float = 0.0
    fatal: str | None = None

    @property
    def failed(self) -> list[SlideResult]:
        return [s for s in self.slides if s.status == "failed"]

    @property
    def patches(self) -> int:
        return sum(s.patches for s in self.slides)

    @property
    def blocks_encoded(self) -> int:
        return sum(s.blocks_encoded for s in self.slides)


def compression_config(settings: EncoderSettings, block: int, min_tissue: float, mask_mpp: float,
                       stride: int | None = None) -> CompressionConfig:
    """The store settings for an encoder: its grid (``stride``: px between patches at the encoder's
    µm/px, default the encoder's own), code size and the hash of its weights."""
    spec = get_spec(settings.name)  # the spec and the weights' hash: no network is built here
    if block <= 0:
        raise NicError(f"--block must be a positive number of cells, not {block}")
    if stride is not None and not 0 < stride <= spec.patch_size:
        raise NicError(f"--stride must be between 1 and the encoder's patch size ({spec.patch_size} px), not {stride}")
    return CompressionConfig(
        encoder=spec.name,
        encoder_sha256=weights_sha256(settings.name, settings.weights, settings.random_init, settings.seed),
        code_dim=spec.code_dim, mpp=spec.mpp, patch_size=spec.patch_size, stride=stride or spec.stride, block=block,
        min_tissue=min_tissue, mask_mpp=mask_mpp, precision=settings.precision, dihedral_mean=settings.dihedral_mean,
    )


def expected_errors_as_results(task):
    """Return a bad slide as ``{"error": reason}`` (a result to report, not a traceback on the
    worker), and a full disk as ``{"error": ..., "fatal": True}`` (the run stops)."""

    @functools.wraps(task)
    def run(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except SlideError as err:
            return {"error": err.reason}
        except NicError as err:
            return {"error": str(err)}
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                return {"error": f"no space left to write the store ({err.filename or err})", "fatal": True}
            raise

    return run


def _finished_slide(store: str, group: zarr.Group, job: SlideJob, options: RunOptions) -> dict | None:
    """For a slide the store holds as complete: None to (re)compress it, or a skip result.

    A changed file or µm/px fails the slide unless ``redo_changed``; damaged shards are deleted
    and the slide reopened, so only they are encoded again.
    """
    attrs = group.attrs
    asked = job.mpp if job.mpp is not None and (job.force_mpp or attrs.get("mpp_source") != "metadata") else None
    full = options.verify or options.redo_changed  # hash the whole file whatever its mtime says
    changed = ("the slide file changed" if source_changed(attrs, job.path, full=full)
               else f"its µm/px changed ({attrs.get('slide_mpp')} -> {asked})" if asked not in (None, attrs.get("slide_mpp"))
               else None)
    if changed:
        if not options.redo_changed:
            raise SlideError(job.path, f"{changed} since it was compressed; pass --redo-changed to compress it again")
        remove_slide(store, job.slide_id)
        return None
    damaged = check_slide(group, verify=options.verify)
    if not damaged:
        return {"skipped": True, "entry": index_entry(store, job.slide_id)}
    for blk, _ in damaged:
        if block_done(group, blk):
            delete_block(group, blk)
    group.attrs["status"] = IN_PROGRESS
    return None


@expected_errors_as_results
def detect_tissue(store: str, job: SlideJob, config: CompressionConfig, options: RunOptions = RunOptions(),
                  settings: EncoderSettings = EncoderSettings()) -> dict:
    """Task: settle the slide's µm/px, find its tissue, lay the grid, create its group; returns the
    grid and the blocks still to encode (or ``skipped`` for an intact finished slide). With one
    block or none left, encodes and finalizes it here and returns what ``finalize-slide`` would.

    On a GPU worker the low-resolution level is read with cuCIM into GPU memory and the mask runs
    on CuPy, through the same functions as on the CPU.
    """
    if slide_damage(store, job.slide_id):  # a zarr.json or the tissue chunk damaged: make the slide again
        remove_slide(store, job.slide_id)
    group = find_slide_group(store, job.slide_id)
    if group is not None and group.attrs.get("status") == COMPLETE:
        finished = _finished_slide(store, group, job, options)
        if finished:
            return finished
    with open_slide(job.path, device=resolve_array_device(settings.device)) as slide:
        mpp, mpp_source = slide_mpp(slide.mpp, job)
        grid = Grid(*slide.dimensions, mpp, config.mpp, config.patch_size, config.stride)
        if 0 in grid.shape:
            raise SlideError(job.path, f"smaller than one {config.patch_size} px patch at {config.mpp} µm/px")
        slide.mpp = mpp
        mask, mask_mpp = slide_tissue_mask(slide, mask_mpp=config.mask_mpp)
        tissue = np.asarray(cell_coverage(mask, mask_mpp, grid.cell_um, grid.shape, grid.patch_um))
        stain = source_stain_attrs(slide, grid, tissue, config)  # the slide's own stain, fitted once
    if not (tissue >= config.min_tissue).any():
        raise SlideError(job.path, f"no grid cell has {config.min_tissue:.0%} tissue; nothing to encode")
    attrs = {**source_fingerprint(job.path), "mpp_source": mpp_source, **stain}
    block = slide_block(tissue, config.block, config.min_tissue)
    group = create_slide(store, job.slide_id, grid, dataclasses.replace(config, block=block), tissue, attrs)
    blocks = blocks_with_tissue(tissue, group.attrs["block"], config.min_tissue)  # a resumed slide keeps its own
    todo = [(blk, n) for blk, n in blocks if not block_done(group, blk)]
    found = {"grid": grid, "todo": todo, "blocks_skipped": len(blocks) - len(todo),
             "tissue_cells": sum(n for _, n in blocks)}
    if len(todo) > 1:
        return found
    encoded = [encode_block(store, job.path, job.slide_id, grid, blk, config, settings) for blk, _ in todo]
    return {**found, "todo": [], "blocks_encoded": len(encoded), **finalize_slide(store, job.slide_id, *encoded)}


encode_block_task = expected_errors_as_results(encode_block)


@expected_errors_as_results
def finalize_slide(store: str, slide_id: str, *block_results: dict) -> dict:
    """Task: mark the slide complete once all its blocks are written without error."""
    errors = [r for r in block_results if "error" in r]
    if errors:
        return errors[0]
    mark_complete(open_slide_group(store, slide_id))
    return {"patches": sum(r["patches"] for r in block_results), "entry": index_entry(store, slide_id)}


class _Run:
    """The client side of one compression run: submits slides through a bounded window and
    turns results into a :class:`CompressReport`."""

    def __init__(self, client, store: str, config: CompressionConfig, settings: EncoderSettings,
                 options: RunOptions, window: int, progress: bool):
        self.client, self.store, self.config, self.settings, self.options = client, store, config, settings, options
        self.token = uuid.uuid4().hex[:8]
        self.window = window
        self.pending = as_completed()
        self.index = IndexWriter(store, self.token)
        self.results: dict[str, SlideResult] = {}
        self.jobs: dict[str, SlideJob] = {}
        self.gpu = gpu_resources(client)
        self.slides_bar = progress_bar(total=0, desc="slides", unit="slide", disable=not progress, position=0)
        self.patches_bar = progress_bar(total=0, desc="patches", unit="patch", disable=not progress, position=1,
                                        growing=True)  # known slide by slide, once tissue is found
        self.in_flight = 0
        self.published = 0.0
        self.fatal: str | None = None

    def key(self, kind: str, slide_id: str, *rest) -> tuple:
        return (kind, self.token, slide_id, *rest)

    def start(self, job: SlideJob) -> None:
        self.in_flight += 1
        future = self.client.submit(detect_tissue, self.store, job, self.config, self.options, self.settings,
                                    key=self.key("detect-tissue", job.slide_id), resources=self.gpu, pure=False)
        self.pending.add(future)

    def submit_blocks(self, job: SlideJob, detected: dict) -> None:
        # largest first (in patches): the last tasks are then short, and the workers finish together
        blocks = [blk for blk, _ in sorted(detected["todo"], key=lambda todo: -todo[1])]
        n = len(blocks)
        futures = self.client.map(
            encode_block_task, [self.store] * n, [job.path] * n, [job.slide_id] * n, [detected["grid"]] * n,
            blocks, [self.config] * n, [self.settings] * n,
            key=[self.key("encode-block", job.slide_id, *blk.index) for blk in blocks], resources=self.gpu,
            pure=False,
        )
        final = self.client.submit(finalize_slide, self.store, job.slide_id, *futures,
                                   key=self.key("finalize-slide", job.slide_id), pure=False)
        self.pending.update(futures)
        self.pending.add(final)

    def finish(self, result: SlideResult, status: str, error: str | None = None) -> None:
        if result.status in ("complete", "skipped", "failed", "stopped"):
            return
        result.status, result.error = status, error
        self.in_flight -= 1
        self.slides_bar.update(1)
        self.publish(force=True)

    def publish(self, force: bool = False) -> None:
        """Progress to the scheduler's Prometheus metrics, at most once a second."""
        now = time.monotonic()
        if force or now - self.published >= 1.0:
            self.published = now
            publish_progress(self.client, self.store, self.slides_bar.n, self.slides_bar.total,
                             sum(r.patches for r in self.results.values()))

    def handle(self, future) -> None:
        kind, _, slide_id = future.key[:3]
        result, job = self.results[slide_id], self.jobs[slide_id]
        if future.status == "error":  # a bug, not bad input: keep the exception type
            err = future.exception()
            value = {"error": f"{type(err).__name__}: {err}"}
        else:
            value = future.result()
        if "error" in value:
            if value.get("fatal"):  # the run stops: this slide is not at fault
                self.fatal = value["error"]
            self.finish(result, "stopped" if value.get("fatal") else "failed", value["error"])
        elif kind == "detect-tissue":
            if value.get("skipped"):
                self.index.add(value["entry"])
                self.finish(result, "skipped")
                return
            result.tissue_cells, result.blocks_skipped = value["tissue_cells"], value["blocks_skipped"]
            self.patches_bar.total += sum(n for _, n in value["todo"]) + value.get("patches", 0)
            self.patches_bar.refresh()
            if "entry" in value:  # one block or none: encoded and finalized in the same task
                self.blocks_done(result, value["blocks_encoded"], value["patches"])
                self.complete(result, value["entry"])
            else:
                self.submit_blocks(job, value)
        elif kind == "encode-block":
            self.blocks_done(result, 1, value["patches"])
        else:
            self.complete(result, value["entry"])

    def blocks_done(self, result: SlideResult, blocks: int, patches: int) -> None:
        result.blocks_encoded += blocks
        result.patches += patches
        self.patches_bar.update(patches)
        self.publish()

    def complete(self, result: SlideResult, entry: dict) -> None:
        self.index.add(entry)
        self.finish(result, "complete")

    def run(self, jobs: list[SlideJob]) -> None:
        queue = deque()
        for job in jobs:
            self.results[job.slide_id] = SlideResult(job.slide_id, job.path)
            self.jobs[job.slide_id] = job
            if job.problem:
                self.results[job.slide_id].status, self.results[job.slide_id].error = "failed", job.problem
            else:
                queue.append(job)
        self.slides_bar.total = len(queue)
        # one span per run: the dashboard's metrics of this run (a span per slide is never freed by
        # the scheduler, and a task group's tasks all land on the span of its first slide anyway)
        with self.slides_bar, self.patches_bar, span("nic-compress", self.token):
            while queue and self.in_flight < self.window:
                self.start(queue.popleft())
            for future in self.pending:
                self.handle(future)
                if self.fatal:
                    self.client.cancel(list(self.pending.futures))
                    break
                while queue and self.in_flight < self.window:
                    self.start(queue.popleft())


def compress(
    jobs: list[SlideJob],
    store,
    client,
    settings: EncoderSettings = EncoderSettings(),
    block: int = DEFAULT_BLOCK,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    mask_mpp: float = DEFAULT_MASK_MPP,
    progress: bool = True,
    options: RunOptions = RunOptions(),
    window: int | None = None,
    stain_norm: str = "none",
    stain_target: str | None = None,
    stride: int | None = None,
) -> CompressReport:
    """Compress ``jobs`` into ``store`` (an absolute path every worker sees) on ``client``'s cluster.

    ``window``: slides in flight at once (default: twice the workers, at least 4).
    ``stain_norm``/``stain_target``: normalise each slide's stain onto a reference file's or the
    cohort's (``"cohort"``) before encoding (:mod:`nic_pipeline.compress.stain_fit`); ``stride``: px
    between patches (default the encoder's; 64 with 128 px patches: overlapping, 4x the cells).
    """
    started = time.perf_counter()
    store = absolute(store)  # the workers' working directory is not this one
    config = compression_config(settings, block, min_tissue, mask_mpp, stride)
    config = with_stain_target(config, stain_norm, stain_target, jobs, client, store)
    root = open_store(store, config)
    client.register_plugin(NicWorker())
    workers = client.scheduler_info(n_workers=-1)["workers"]
    encoding = [w for w, info in workers.items() if info.get("resources", {}).get("GPU")] or list(workers)
    # best effort: loads while the first slides' tissue is found; a worker lost meanwhile is no error
    client.run(warm_encoder, settings, workers=encoding, on_error="ignore")
    run = _Run(client, store, config, settings, options, window or max(4, 2 * len(workers)), progress)
    try:
        run.run(jobs)
    finally:
        run.index.close()
    report = CompressReport(store, run.token, list(run.results.values()), time.perf_counter() - started, run.fatal)
    if report.fatal:  # the disk is full: writing more would only fail again
        return report
    record_failures(root, {s.slide_id: s.error for s in report.failed},
                    [s.slide_id for s in report.slides if s.status in ("complete", "skipped")])
    record_run(root, run_manifest(report, config, settings, client))
    return report


def run_manifest(report: CompressReport, config: CompressionConfig, settings: EncoderSettings, client) -> dict:
    """What ran, where, with which settings and versions: kept with the store."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    counts = {status: sum(s.status == status for s in report.slides) for status in ("complete", "skipped", "failed")}
    return {
        "run": report.run, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv,
        "client_host": platform.node(), "scheduler": client.scheduler.address, "workers": len(workers),
        "worker_hosts": sorted({w.get("host") for w in workers.values()} - {None}),
        "settings": {**config.as_attrs(), "device": settings.device, "batch_size": settings.batch_size},
        "slides": counts, "patches": report.patches, "seconds": round(report.seconds, 1),
        "versions": package_versions(), "stopped": report.fatal,
    }
