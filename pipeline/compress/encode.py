"""Worker side of compression: read a block of cells, keep the tissue, encode it, write it.

Encoders and open slides live in one :class:`NicWorker` plugin on each worker: an encoder is
loaded once per worker (on the worker's GPU when it has one) and shared by every task and every
job that asks for the same settings; at most ``max_encoders`` stay loaded. Each worker picks its
own device and precision (:mod:`nic_pipeline.runtime.device`), and every block reports what it ran
with. Pixels go from the reader to the encoder on the worker's device (cuCIM ``device="cuda"``,
CuPy, torch through the CUDA array interface, zero-copy); the next band of a block is read while
the current one is encoded; only the block's codes are written out, and only small metadata
leaves the task.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from importlib import import_module

import numpy as np
from distributed import WorkerPlugin, get_worker
from distributed.metrics import context_meter

from nic_pipeline.compress.grid import Block, Grid
from nic_pipeline.compress.settings import EncoderSettings
from nic_pipeline.compress.stain import normaliser
from nic_pipeline.compress.store import CompressionConfig, block_name, open_slide_group, write_block
from nic_pipeline.io import open_slide
from nic_pipeline.runtime.arrays import array_namespace
from nic_pipeline.runtime.process import keep_freed_memory, serialise_ast_parsing, warnings_in_one_line

BAND_PX = 512
"""Height of the strips a block is read in, at the grid's µm/px: a multiple of the usual 256 and
512 px tiles, so that each JPEG tile is decoded once."""


def read_cells(slide, grid: Grid, block: Block, rows: np.ndarray, cols: np.ndarray):
    """uint8 patches (n, P, P, 3) of cells (rows, cols) of ``block`` (row-major, as np.nonzero
    gives them), at the grid's µm/px."""
    pieces = list(iter_bands(slide, grid, block, rows, cols))
    xp = array_namespace(pieces[0])
    return pieces[0] if len(pieces) == 1 else xp.concatenate(pieces)


def iter_bands(slide, grid: Grid, block: Block, rows: np.ndarray, cols: np.ndarray):
    """The patches of the cells (rows, cols), one horizontal band of about :data:`BAND_PX` at a time.

    Each band is one region spanning only the columns where that band has tissue: tile-aligned
    decoding without the background beside the tissue. Cells are then gathered by fancy
    indexing, on the reader's device.
    """
    band = max(1, BAND_PX // grid.stride)
    for first in range(0, block.shape[0], band):
        in_band = (rows >= first) & (rows < first + band)
        if in_band.any():
            yield _read_span(slide, grid, block, rows[in_band], cols[in_band])


def prefetched(items, depth: int = 1):
    """Iterate ``items`` with the next ``depth`` produced by a thread while the caller works on the
    current one: decoding the next band overlaps encoding this one (both release the GIL)."""
    iterator = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="nic-prefetch") as pool:
        queue = [pool.submit(next, iterator, None) for _ in range(depth)]
        while True:
            item = queue.pop(0).result()
            if item is None:
                return
            queue.append(pool.submit(next, iterator, None))
            yield item


def _read_span(slide, grid: Grid, block: Block, rows: np.ndarray, cols: np.ndarray):
    """The cells (rows, cols) of a block, from one region covering their bounding box."""
    r0, c0 = int(rows.min()), int(cols.min())
    height = int(rows.max() - r0) * grid.stride + grid.patch_size
    width = int(cols.max() - c0) * grid.stride + grid.patch_size
    x0, y0 = grid.cell_origin_px(np.array([block.y0 + r0]), np.array([block.x0 + c0]))
    region = slide.read_regions_at_mpp([(int(x0[0]), int(y0[0]))], (width, height), grid.mpp)[0]
    xp = array_namespace(region)
    if grid.stride == grid.patch_size:  # abutting patches: a view of whole patches, then one gather
        size = grid.patch_size
        patches = region.reshape(height // size, size, width // size, size, 3).swapaxes(1, 2)
        return patches[xp.asarray(rows - r0), xp.asarray(cols - c0)]
    offsets = xp.arange(grid.patch_size)
    ys = xp.asarray((rows - r0) * grid.stride)[:, None] + offsets
    xs = xp.asarray((cols - c0) * grid.stride)[:, None] + offsets
    return region[ys[:, :, None], xs[:, None, :]]


class NicWorker(WorkerPlugin):
    """State that compression keeps on each worker: loaded encoders and open slides.

    One plugin per worker whatever the job (``idempotent``: registering it again is a no-op), so
    jobs that share a cluster share its encoders, and at most ``max_encoders`` stay in memory.
    Thread-safe: ``dask worker`` runs several task threads; a slide is closed only when no task
    is reading it.
    """

    idempotent = True
    name = "nic-worker"

    def __init__(self, max_encoders: int = 2, max_open_slides: int = 8):
        self.max_encoders = max_encoders
        self.max_open_slides = max_open_slides
        self._start_empty()

    def _start_empty(self):
        self._encoders: OrderedDict[str, object] = OrderedDict()
        self._slides: OrderedDict[tuple, list] = OrderedDict()  # key -> [slide, tasks reading it]
        self._lock = threading.Lock()
        self._encoder_lock = threading.Lock()
        self.nthreads = 1
        self.loads: list[tuple[str, float, float]] = []  # (encoder, start, end) of each load: where start-up goes

    def __getstate__(self):  # shipped to workers as its limits only
        return {"max_encoders": self.max_encoders, "max_open_slides": self.max_open_slides}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._start_empty()

    def setup(self, worker=None):
        if worker is not None:
            self.nthreads = max(1, worker.state.nthreads)
        # A worker process that ran torch spends seconds in the interpreter's final garbage
        # collections when it exits (the cluster's shutdown waits for it): skip them.
        atexit.register(gc.freeze)
        keep_freed_memory()  # batches reuse the heap instead of faulting in fresh pages
        serialise_ast_parsing()  # warm() imports torch beside tasks that import scikit-image
        warnings_in_one_line()  # a slide's warning (e.g. tissue detection's second opinion) reaches the log as one line

    def teardown(self, worker=None):
        with self._lock:
            for slide, _ in self._slides.values():
                slide.close()
            self._slides.clear()
            self._encoders.clear()

    def encoder(self, settings: EncoderSettings):
        """The encoder for ``settings`` (a :class:`nic_pipeline.compress.codes.LoadedEncoder`), loaded
        on first use (once per worker)."""
        with self._encoder_lock:
            if settings.key in self._encoders:
                self._encoders.move_to_end(settings.key)
                return self._encoders[settings.key]
            started = time.time()
            codes = import_module("nic_pipeline.compress.codes")  # torch: on the workers only, when first needed
            loaded = self._encoders[settings.key] = codes.load_encoder(settings, self.nthreads)
            self.loads.append((settings.name, started, time.time()))
            while len(self._encoders) > self.max_encoders:
                self._encoders.popitem(last=False)
            return loaded

    def warm(self, settings: EncoderSettings) -> None:
        """Load the encoder in a background thread, so that importing torch and reading the weights
        overlap the slides' tissue detection; the first block then finds it ready (or waits on the
        lock), and a failure is left for that block to report."""

        def load():
            with contextlib.suppress(Exception):
                self.encoder(settings)

        threading.Thread(target=load, name="nic-warm-encoder", daemon=True).start()

    @contextlib.contextmanager
    def slide(self, path: str, mpp: float | None, device: str):
        """An open slide, reused by the blocks of a slide that run on this worker (a file replaced
        since it was opened is opened anew: the key holds its size and mtime)."""
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns, mpp, device)
        with self._lock:
            entry = self._slides.get(key)
            if entry is None:
                entry = self._slides[key] = [open_slide(path, mpp=mpp, device=device), 0]
            self._slides.move_to_end(key)
            entry[1] += 1
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                self._evict()

    def _evict(self):
        """Close the least recently used idle slides beyond ``max_open_slides``."""
        idle = [k for k, (_, readers) in self._slides.items() if readers == 0]
        for key in idle[: max(0, len(self._slides) - self.max_open_slides)]:
            self._slides.pop(key)[0].close()


def warm_encoder(settings: EncoderSettings, dask_worker=None) -> None:
    """``client.run`` target: start loading the encoder on this worker and return at once."""
    dask_worker.plugins[NicWorker.name].warm(settings)


def worker_state() -> NicWorker:
    """This worker's :class:`NicWorker` (registered by the client before any task runs)."""
    return get_worker().plugins[NicWorker.name]


def encode_block(store: str, slide_path: str, slide_id: str, grid: Grid, block: Block,
                 config: CompressionConfig, settings: EncoderSettings, state: NicWorker | None = None) -> dict:
    """Read, filter, encode and write one block; return how many patches it encoded and how.

    The slide is read at the µm/px that ``detect-tissue`` settled, which the grid carries
    (``grid.slide_mpp``): one value, given one way."""
    state = state or worker_state()
    encoder = state.encoder(settings)
    group = open_slide_group(store, slide_id)
    tissue = group["tissue"][block.slices]
    rows, cols = np.nonzero(tissue >= config.min_tissue)
    features = np.zeros((config.code_dim, *block.shape), np.float16)
    normalise = normaliser(config.stain_norm, config.stain_target, group.attrs.get("stain_source"))
    with state.slide(slide_path, grid.slide_mpp, encoder.device) as slide:
        done = 0
        for patches in prefetched(map(normalise, iter_bands(slide, grid, block, rows, cols))):
            n = len(patches)
            with context_meter.meter("encode"):
                features[:, rows[done:done + n], cols[done:done + n]] = encoder.encode(patches).T
            done += n
        decoder = slide.decoder  # after the reads: which decoder served them
    with context_meter.meter("write"):
        write_block(group, block, features, {"device": encoder.device, "precision": encoder.precision, "decoder": decoder})
    return {"slide_id": slide_id, "block": block_name(block), "patches": int(len(rows))}
