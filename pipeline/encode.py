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

from .grid import Block, Grid
from .arrays import array_namespace
from .store import CompressionConfig, write_block


@dataclass(frozen=True)
class EncoderSettings:
    """How to build the encoder on a worker; small and picklable, shipped to every worker."""

    name: str = "nic"
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    precision: str = "auto"
    dihedral_mean: bool = False
    batch_size: int = 256
    device: str = "auto"

    @property
    def plugin_name(self) -> str:
        """The same on the client and every worker (``hash()`` is salted per process)."""
        digest = hashlib.sha256(repr(self).encode()).hexdigest()[:12]
        return f"nic-encoder-{digest}"


def pick_device(wanted: str = "auto") -> str:
    """``cuda`` when this process sees a GPU (dask-cuda pins one per worker), else ``cpu``."""
    import torch

    if wanted != "auto":
        return wanted
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` means fp16 autocast on GPU and bf16 autocast on CPU (3x faster there than fp32)."""
    if precision != "auto":
        return precision
    return "fp16" if device == "cuda" else "bf16"


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


def read_cells(slide, grid: Grid, block: Block, rows: np.ndarray, cols: np.ndarray):
    """uint8 patches (n, P, P, 3) of cells (rows, cols) of ``block``, at the grid's µm/px.

    The block's whole extent is read once (tile-aligned decoding beats many small reads), then
    the tissue cells are gathered from it by fancy indexing, on the reader's device.
    """
    height = (block.shape[0] - 1) * grid.stride + grid.patch_size
    width = (block.shape[1] - 1) * grid.stride + grid.patch_size
    x0, y0 = grid.cell_origin_px(np.array([block.y0]), np.array([block.x0]))
    region = slide.read_regions_at_mpp([(int(x0[0]), int(y0[0]))], (width, height), grid.mpp)[0]
    xp = array_namespace(region)
    offsets = xp.arange(grid.patch_size)
    ys = xp.asarray(rows * grid.stride)[:, None] + offsets
    xs = xp.asarray(cols * grid.stride)[:, None] + offsets
    return region[ys[:, :, None], xs[:, None, :]]


class EncoderPlugin(WorkerPlugin):
    """Worker plugin holding the encoder and a small cache of open slides on each worker."""

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

        self.device = pick_device(self.settings.device)
        if self.device == "cpu" and worker is not None:
            torch.set_num_threads(max(1, worker.state.nthreads))
        self.precision = resolve_precision(self.settings.precision, self.device)
        self.encoder = build_encoder(self.settings, self.device)

    def teardown(self, worker=None):
        for slide in self._slides.values():
            slide.close()
        self._slides.clear()

    def slide(self, path: str, mpp: float | None):
        """An open slide, reused across the blocks of a slide that run on this worker."""
        from .slides import open_slide

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
        return encode_patches(self.encoder, patches, self.precision, self.settings.batch_size)


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
