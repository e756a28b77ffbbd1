"""One code path for NumPy and CuPy: the array namespace of an input, and the image libraries
that match it (scipy.ndimage / skimage on the CPU, cupyx.scipy.ndimage / cucim.skimage on the
GPU). CuPy is imported only when a CuPy array is seen: it imports fine without a GPU, but any
kernel would fail.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np


def array_namespace(x) -> ModuleType:
    """``cupy`` for a CuPy array, else ``numpy``."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def is_cupy(xp: ModuleType) -> bool:
    return xp.__name__ == "cupy"


def to_numpy(x) -> np.ndarray:
    """A host copy of a CuPy array; NumPy input as it is."""
    return x.get() if is_cupy(array_namespace(x)) else np.asarray(x)


def ndimage(xp: ModuleType) -> ModuleType:
    """scipy.ndimage for NumPy, cupyx.scipy.ndimage for CuPy."""
    return importlib.import_module("cupyx.scipy.ndimage" if is_cupy(xp) else "scipy.ndimage")


def skimage(xp: ModuleType, submodule: str) -> ModuleType:
    """``skimage.<submodule>`` for NumPy, ``cucim.skimage.<submodule>`` for CuPy."""
    return importlib.import_module(("cucim.skimage." if is_cupy(xp) else "skimage.") + submodule)
