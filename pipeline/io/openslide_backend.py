"""OpenSlide reader: NDPI, MRXS, SCN, DICOM and every other format OpenSlide knows, and the
fallback for TIFFs cuCIM cannot decode. CPU decode, one region at a time; on ``device="cuda"``
the result is copied to the GPU so callers get CuPy either way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from nic_pipeline.io.base import SlideBackend, device_namespace
from nic_pipeline.io.files import SUFFIXES
from nic_pipeline.io.metadata import plausible_mpp


class OpenSlideReader(SlideBackend):
    """OpenSlide: NDPI, MRXS, SCN, DICOM and the rest; CPU decode, one region at a time."""

    name = "openslide"
    suffixes = SUFFIXES
    decoder = "openslide"

    def __init__(self, path: Path, device: str = "cpu"):
        self._slide = openslide.OpenSlide(str(path))
        self._properties = dict(self._slide.properties)
        self.level_dimensions = self._slide.level_dimensions
        self.level_downsamples = self._slide.level_downsamples
        self.format = self._properties.get("openslide.vendor", "unknown")
        self.vendor = None if self.format == "generic-tiff" else self.format

    def metadata_mpp(self) -> float | None:
        return plausible_mpp(self._properties.get("openslide.mpp-x"))

    def read_many(self, locations, size, level, device):
        batch = np.stack([self._read_one(location, size, level) for location in locations])
        return device_namespace(device).asarray(batch)

    def _read_one(self, location, size, level) -> np.ndarray:
        """RGB of one region; transparent pixels (outside the scanned area) become white, like cuCIM."""
        rgba = np.asarray(self._slide.read_region(location, level, size))
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    def close(self):
        self._slide.close()
