"""cuCIM reader: generic tiled TIFF, Aperio SVS and Philips TIFF, decoded on CPU or straight into
GPU memory (``device="cuda"``), many regions per call with worker threads. cuCIM is optional
(a CPU-only install may lack it), so it is imported when a file is opened."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from pipeline.io.base import SlideBackend, device_namespace
from pipeline.io.metadata import cucim_mpp

BATCH_SIZE = 32  # regions per cuCIM batch


class CucimReader(SlideBackend):
    """cuCIM: generic tiled TIFF, Aperio SVS, Philips TIFF; CPU or GPU decode, batched reads."""

    name = "cucim"
    suffixes = frozenset({".svs", ".tif", ".tiff"})
    decoder = "cucim-cpu"

    @classmethod
    def guess_can_open(cls, path: Path) -> bool:
        return super().guess_can_open(path) and importlib.util.find_spec("cucim") is not None

    def __init__(self, path: Path):
        from cucim import CuImage

        self._image = CuImage(str(path))
        self._metadata = self._image.metadata
        resolutions = self._image.resolutions
        self.level_dimensions = resolutions["level_dimensions"]
        self.level_downsamples = resolutions["level_downsamples"]
        self.format, self.vendor = cucim_format(self._metadata)
        self._probe()

    def _probe(self):
        """Decode one pixel: cuCIM opens some TIFFs (zstd, packbits) it then cannot decode."""
        np.asarray(self._image.read_region((0, 0), (1, 1), len(self.level_dimensions) - 1))

    def metadata_mpp(self) -> float | None:
        return cucim_mpp(self._metadata)

    def read_many(self, locations, size, level, device):
        xp = device_namespace(device)
        if len(locations) == 1:
            return copy_rgb(self._image.read_region(locations[0], size, level, device=device), xp)
        batches = self._image.read_region(
            locations,
            size,
            level,
            device=device,
            num_workers=min(len(locations), os.cpu_count() or 1),
            batch_size=min(len(locations), BATCH_SIZE),
        )
        return xp.concatenate([copy_rgb(batch, xp) for batch in batches])

    def close(self):
        self._image.close()


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
