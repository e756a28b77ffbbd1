"""The dihedral group D4: the 8 rotations/flips of an image or a grid, defined once.

Element ``k`` (0..7) is ``k % 4`` quarter turns, then a mirror of the second spatial axis when
``k >= 4``. The same functions take torch tensors and NumPy/CuPy arrays (``dims``: the two
spatial axes), so augmentation, test-time averaging, Grad-CAM and rotation-invariant codes
all agree on which element is which.
"""

from __future__ import annotations

import torch

ORDER = 8


def _ops(x):
    """(rot90, flip) for the array's library: torch, or the NumPy-compatible namespace."""
    if isinstance(x, torch.Tensor):
        return (lambda a, k, dims: torch.rot90(a, k, dims=dims)), (lambda a, axis: torch.flip(a, dims=(axis,)))
    import numpy as np

    xp = np if type(x).__module__.split(".")[0] != "cupy" else __import__("cupy")
    return (lambda a, k, dims: xp.rot90(a, k, axes=dims)), (lambda a, axis: xp.flip(a, axis=axis))


def dihedral(x, k: int, dims: tuple[int, int] = (-2, -1)):
    """The k-th rotation/flip of ``x`` over its spatial ``dims`` (k in 0..7)."""
    rot90, flip = _ops(x)
    x = rot90(x, k % 4, dims)
    return flip(x, dims[1]) if k >= 4 else x


def dihedral_inverse(x, k: int, dims: tuple[int, int] = (-2, -1)):
    """Undo :func:`dihedral`: map a transformed map back onto the original grid."""
    rot90, flip = _ops(x)
    if k >= 4:
        x = flip(x, dims[1])
    return rot90(x, -(k % 4), dims)


def dihedral_views(x, dims: tuple[int, int] = (-2, -1)) -> list:
    """All 8 rotations/flips of ``x``, element ``k`` at index ``k``."""
    return [dihedral(x, k, dims) for k in range(ORDER)]
