"""The dihedral group D4: the 8 rotations/flips of an image or a grid, defined once.

Element ``k`` (0..7) is ``k % 4`` quarter turns, then a mirror of the second spatial axis when
``k >= 4``. The same functions take torch tensors and NumPy/CuPy arrays (``dims``: the two
spatial axes), so augmentation, test-time averaging, Grad-CAM and rotation-invariant codes
all agree on which element is which.
"""

from __future__ import annotations

import numpy as np

ORDER = 8


def _ops(x):
    """(rot90, flip) for the array's library: torch tensors by their methods (so this module needs
    no torch import), NumPy and CuPy arrays by their namespace."""
    if hasattr(x, "rot90"):  # torch.Tensor
        return (lambda a, k, dims: a.rot90(k, dims)), (lambda a, axis: a.flip((axis,)))
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
