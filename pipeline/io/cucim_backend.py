"""cuCIM reader: generic tiled TIFF, Aperio SVS and Philips TIFF, decoded on CPU or straight into
GPU memory (``device="cuda"``), many regions per call with worker threads. cuCIM is optional
(a CPU-only install may lack it), so it is imported when a file is opened.

Which decoder runs is a per-process choice of cuCIM, made when cuCIM is first imported:

* ``cucim.kit.cuslide`` (default): libjpeg-turbo / OpenJPEG on the CPU; with ``device="cuda"``
  its batched reads decode JPEG tiles with nvJPEG on the GPU (``cucim-nvjpeg``).
* ``cucim.kit.cuslide2`` (``ENABLE_CUSLIDE2=1``): nvImageCodec, GPU decoding of JPEG and JPEG
  2000 (``cucim-nvimagecodec``). :func:`prepare_gpu_decoding` turns it on before cuCIM loads
  when a GPU and a working nvImageCodec are present. nvImageCodec 0.9.x is refused: its GPU
  JPEG region decoding fails (NVIDIA/nvImageCodec#55, worked in 0.8).

:attr:`CucimReader.decoder` says which one this process actually loaded (from the plugin
libraries mapped into the process, not from the settings).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from nic_pipeline.io.base import SlideBackend, device_namespace
from nic_pipeline.io.metadata import cucim_mpp
from nic_pipeline.runtime.device import cupy_gpu, usable_cpus

BATCH_SIZE = 32  # regions per cuCIM batch
GPU_DECODING_ENV = "ENABLE_CUSLIDE2"
NVIMGCODEC_DISTRIBUTIONS = ("nvidia-nvimgcodec-cu12", "nvidia-nvimgcodec-cu13")
BROKEN_NVIMGCODEC = {"0.9": "nvImageCodec 0.9 fails at GPU JPEG region decoding (NVIDIA/nvImageCodec#55); use 0.8"}
log = logging.getLogger(__name__)
SLOW_PATH_WARNING = re.compile(rb"\[Warning\] Loading image\('[^\n]*'\) with a slow-path\.[^\n]*\n?")
"""What cuCIM's C++ prints to the process's stderr at the first read of a TIFF it decodes through
libtiff's RGBA path (16-bit samples, strips instead of tiles, planar or palette images): the
pixels are right (cut to RGB by :func:`copy_rgb`), the line is noise to a user."""
_STDERR_SWAP = threading.RLock()  # one swap of the process's fd 1/2 at a time, or one restores another's


class CucimReader(SlideBackend):
    """cuCIM: generic tiled TIFF, Aperio SVS, Philips TIFF; CPU or GPU decode, batched reads."""

    name = "cucim"
    suffixes = frozenset({".svs", ".tif", ".tiff"})

    @classmethod
    def guess_can_open(cls, path: Path) -> bool:
        return super().guess_can_open(path) and importlib.util.find_spec("cucim") is not None

    def __init__(self, path: Path, device: str = "cpu"):
        if device == "cuda":
            prepare_gpu_decoding()
        with quiet_cufile():
            from cucim import CuImage

            self._image = CuImage(str(path))
        self._metadata = self._image.metadata
        resolutions = self._image.resolutions
        self.level_dimensions = resolutions["level_dimensions"]
        self.level_downsamples = resolutions["level_downsamples"]
        self.format, self.vendor = cucim_format(self._metadata)
        self._probe()
        self.decoder = decoder_name(loaded_plugins(), device)

    def _probe(self):
        """Decode one pixel: cuCIM opens some TIFFs (zstd, packbits) it then cannot decode. cuCIM
        prints its slow-path warning at the first read of each opened image, so this one read
        is the only one that needs it caught."""
        with without_slow_path_warning() as slow_path:
            np.asarray(self._image.read_region((0, 0), (1, 1), len(self.level_dimensions) - 1))
        self.slow_path = bool(slow_path)

    def metadata_mpp(self) -> float | None:
        return cucim_mpp(self._metadata)

    def read_many(self, locations, size, level, device):
        xp = device_namespace(device)
        if len(locations) == 1 or self.slow_path:  # cuCIM's batched read fails on stripped slow-path TIFFs
            return xp.concatenate([copy_rgb(self._image.read_region(location, size, level, device=device), xp)
                                   for location in locations])
        batches = self._image.read_region(
            locations,
            size,
            level,
            device=device,
            num_workers=min(len(locations), usable_cpus()),
            batch_size=min(len(locations), BATCH_SIZE),
        )
        return xp.concatenate([copy_rgb(batch, xp) for batch in batches])

    def close(self):
        self._image.close()


@contextlib.contextmanager
def quiet_cufile():
    """Silence NVIDIA cuFile on machines without a CUDA driver.

    When torch's CUDA wheels are installed, cuCIM finds libcufile, which on a machine without
    libcuda prints "dlopen error libcuda.so.1 ... cuFile initialization failed" to stdout at
    every import and slide open, and writes ``cufile.log`` into the current folder. Its log goes
    to /dev/null (unless ``CUFILE_LOGFILE_PATH`` is set), and without a GPU the process's
    stdout/stderr are pointed at /dev/null for the duration of the call.
    """
    os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)
    if cupy_gpu():
        yield
        return
    with _STDERR_SWAP:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
            os.dup2(null, 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (*saved, null):
                os.close(fd)


@contextlib.contextmanager
def without_slow_path_warning():
    """Keep cuCIM's ``[Warning] Loading image(...) with a slow-path`` line off the terminal.

    cuCIM prints it from C++ straight to file descriptor 2, so neither Python's ``warnings``
    filters nor ``sys.stderr`` see it: the descriptor is pointed at a temporary file for the
    call, and whatever else reached it meanwhile (another thread's log line) is written back.
    Yields a list that holds the caught line once the call is done (empty when cuCIM read the
    image by its fast path).
    """
    found: list[bytes] = []
    with _STDERR_SWAP, tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield found
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            written = caught.read()
            found.extend(SLOW_PATH_WARNING.findall(written))
            rest = SLOW_PATH_WARNING.sub(b"", written)
            if rest:
                os.write(2, rest)


def prepare_gpu_decoding() -> str | None:
    """Switch this process's cuCIM to its nvImageCodec plugin (cuslide2) before cuCIM is first
    imported, when a GPU and a working nvImageCodec are there; returns why not (None when on).

    An ``ENABLE_CUSLIDE2`` the user set is left as it is. Call it at worker start-up to be sure it
    runs before anything imports cuCIM (``cucim.skimage`` imports it too).
    """
    setting = os.environ.get(GPU_DECODING_ENV)
    if setting is not None:
        return None if setting == "1" else f"{GPU_DECODING_ENV}={setting} was set"
    if "cucim.clara" in sys.modules:
        return "cuCIM was imported before GPU decoding could be switched on"
    if not cupy_gpu():
        return "no CUDA GPU"
    problem = nvimgcodec_problem(nvimgcodec_version())
    if problem:
        log.warning("cuCIM decodes on the CPU: %s", problem)
        return problem
    ctypes.CDLL(nvimgcodec_library(), mode=ctypes.RTLD_GLOBAL)  # cuslide2 dlopens it by name
    os.environ[GPU_DECODING_ENV] = "1"
    return None


def nvimgcodec_version() -> str | None:
    """The installed nvImageCodec wheel's version, or None."""
    for distribution in NVIMGCODEC_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def nvimgcodec_problem(version: str | None) -> str | None:
    """Why this nvImageCodec version must not decode, or None when it may."""
    if version is None:
        return "nvImageCodec is not installed (pip install 'nvidia-nvimgcodec-cu12>=0.8,<0.9')"
    for prefix, reason in BROKEN_NVIMGCODEC.items():
        if version == prefix or version.startswith(prefix + "."):
            return f"{reason} (installed: {version})"
    return None


def nvimgcodec_library() -> str:
    """Path of libnvimgcodec.so.0 inside the nvImageCodec wheel (not on the loader's path)."""
    spec = importlib.util.find_spec("nvidia.nvimgcodec")
    return os.path.join(spec.submodule_search_locations[0], "libnvimgcodec.so.0")


def loaded_plugins() -> list[str]:
    """The cuCIM plugin libraries mapped into this process (e.g. ``cucim.kit.cuslide@26.06.00.so``)."""
    try:
        with open("/proc/self/maps") as handle:
            return sorted(set(re.findall(r"cucim\.kit\.\w+@[\w.]+\.so", handle.read())))
    except OSError:
        return []


def decoder_name(plugins: list[str], device: str) -> str:
    """What decodes this process's cuCIM reads: nvImageCodec (cuslide2), nvJPEG (cuslide's
    batched reads to the GPU) or the CPU codecs."""
    if any(plugin.startswith("cucim.kit.cuslide2@") for plugin in plugins):
        return "cucim-nvimagecodec"
    return "cucim-nvjpeg" if device == "cuda" else "cucim-cpu"


def copy_rgb(region, xp):
    """(n, h, w, 3) copy of a cuCIM result: batch buffers are recycled by the loader, so never keep a view."""
    array = xp.array(region, copy=True)
    return array.reshape(-1, *array.shape[-3:])[..., :3]


def cucim_format(metadata: dict) -> tuple[str, str | None]:
    """(format, vendor) in OpenSlide's vocabulary from cuCIM's metadata sections."""
    for vendor in ("aperio", "philips"):
        if metadata.get(vendor):
            return vendor, vendor
    return "generic-tiff", None
