"""Worker side of compression: read a block of cells, keep the tissue, encode it, write it.

The encoder lives in an :class:`EncoderPlugin` registered on every worker, so it is loaded once
per worker (on the worker's GPU when it has one) and shared by all the tasks that run there.
Pixels go from the reader to the encoder on the worker's device (cuCIM ``device="cuda"``, CuPy,
torch through the CUDA array interface, zero-copy) and only the block's codes are written out:
nothing but small metadata leaves the task.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from distributed import WorkerPlugin

from pipeline.compress.grid import Block, Grid
from pipeline.runtime.arrays import array_namespace
from pipeline.runtime.device import resolve_device, resolve_precision
from pipeline.compress.store import CompressionConfig, write_block


@dataclass(frozen=True)
class EncoderSettings:
    """How to build the encoder on a worker; small and picklable, shipped to every worker."""

    name: str = "nic"
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    precision: str = "auto"
    dihedral_mean: bool = False
    batch_size: int | None = None  # None: 256 patches of 128 px, fewer of larger patches
    device: str = "auto"

    @property
    def plugin_name(self) -> str:
        """The same on the client and every worker (``hash()`` is salted per process)."""
        digest = hashlib.sha256(repr(self).encode()).hexdigest()[:12]
        return f"nic-encoder-{digest}"


def default_batch_size(patch_size: int) -> int:
    """256 patches of 128 px, scaled by area for larger patches (64 of 224 px): activations of a
    batch stay around the same few hundred MB whatever the encoder."""
    return max(16, int(256 * (128 / patch_size) ** 2) // 16 * 16)


def build_encoder(settings: EncoderSettings, device: str):
    """Create the encoder from the registry, in eval mode on ``device``."""
    import torch

    from models.registry import create_encoder

    encoder = create_encoder(
        settings.name,
        weights=settings.weights,
        random_init=settings.random_init,
        seed=settings.seed,
        dihedral_mean=settings.dihedral_mean,
    )
    encoder = encoder.to(device).eval()
    if device == "cpu":
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder


def _autocast(device: str, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device, dtype=dtype)


def encode_patches(encoder, patches, precision: str = "fp32", batch_size: int = 256) -> np.ndarray:
    """Codes (n, code_dim) float16 of uint8 NHWC patches (NumPy or CuPy), in batches.

    The encoder takes the arrays as they are (CuPy zero-copy on the GPU) and normalises inside.
    """
    import torch

    device = next(encoder.parameters()).device
    codes = []
    with torch.inference_mode(), _autocast(device.type, precision):
        for start in range(0, len(patches), batch_size):
            codes.append(encoder(patches[start : start + batch_size]).float().cpu().numpy())
    if not codes:
        return np.zeros((0, encoder.spec.code_dim), np.float16)
    return np.concatenate(codes).astype(np.float16)


BAND_PX = 512
"""Height of the strips a block is read in, at the grid's µm/px: a multiple of the usual 256 and
512 px tiles, so that each JPEG tile is decoded once."""


def read_cells(slide, grid: Grid, block: Block, rows: np.ndarray, cols: np.ndarray):
    """uint8 patches (n, P, P, 3) of cells (rows, cols) of ``block`` (row-major, as np.nonzero
    gives them), at the grid's µm/px.

    The block is read in horizontal bands of about :data:`BAND_PX`, each one region spanning
    only the columns where that band has tissue: tile-aligned decoding without the background
    beside the tissue. Cells are then gathered by fancy indexing, on the reader's device.
    """
    band = max(1, BAND_PX // grid.stride)
    pieces = []
    for first in range(0, block.shape[0], band):
        in_band = (rows >= first) & (rows < first + band)
        if in_band.any():
            pieces.append(_read_span(slide, grid, block, rows[in_band], cols[in_band]))
    xp = array_namespace(pieces[0])
    return pieces[0] if len(pieces) == 1 else xp.concatenate(pieces)


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


class EncoderPlugin(WorkerPlugin):
    """Worker plugin holding the encoder and a small cache of open slides on each worker.

    Idempotent: its name is derived from the settings, so later jobs on the same cluster with
    the same encoder reuse the model already loaded on each worker.
    """

    idempotent = True

    def __init__(self, settings: EncoderSettings, max_open_slides: int = 8):
        self.settings = settings
        self.name = settings.plugin_name
        self.max_open_slides = max_open_slides
        self.encoder = None
        self.device = "cpu"
        self.precision = "fp32"
        self._slides: OrderedDict = OrderedDict()

    def setup(self, worker=None):
        import torch

        self.device = resolve_device(self.settings.device)
        if self.device == "cpu" and worker is not None:
            torch.set_num_threads(max(1, worker.state.nthreads))
        self.precision = resolve_precision(self.settings.precision, self.device)
        self.encoder = build_encoder(self.settings, self.device)
        self.batch_size = self.settings.batch_size or default_batch_size(self.encoder.spec.patch_size)

    def teardown(self, worker=None):
        for slide in self._slides.values():
            slide.close()
        self._slides.clear()

    def slide(self, path: str, mpp: float | None):
        """An open slide, reused across the blocks of a slide that run on this worker."""
        from pipeline.io import open_slide

        key = (path, mpp)
        if key in self._slides:
            self._slides.move_to_end(key)
            return self._slides[key]
        slide = open_slide(path, mpp=mpp, device=self.device)
        self._slides[key] = slide
        if len(self._slides) > self.max_open_slides:
            self._slides.popitem(last=False)[1].close()
        return slide

    def encode(self, patches) -> np.ndarray:
        return encode_patches(self.encoder, patches, self.precision, self.batch_size)


def worker_plugin(settings: EncoderSettings) -> EncoderPlugin:
    """This worker's plugin for ``settings`` (set up once, reused by every task)."""
    from distributed import get_worker

    return get_worker().plugins[settings.plugin_name]


def encode_block(
    store: str,
    slide_path: str,
    slide_id: str,
    mpp: float | None,
    grid: Grid,
    block: Block,
    config: CompressionConfig,
    settings: EncoderSettings,
    plugin: EncoderPlugin | None = None,
) -> dict:
    """Read, filter, encode and write one block; return how many patches it encoded."""
    import zarr

    plugin = plugin or worker_plugin(settings)
    group = zarr.open_group(store, path=slide_id, mode="r+", zarr_format=3)
    tissue = group["tissue"][block.slices]
    rows, cols = np.nonzero(tissue >= config.min_tissue)
    features = None
    if len(rows):
        patches = read_cells(plugin.slide(slide_path, mpp), grid, block, rows, cols)
        codes = plugin.encode(patches)
        features = np.zeros((config.code_dim, *block.shape), np.float16)
        features[:, rows, cols] = codes.T
    write_block(group, block, features)
    return {"slide_id": slide_id, "block": block.index, "patches": int(len(rows))}
