"""What an encoder is, without building it: its spec, input normalisations and weight hashes.

Nothing here imports torch, so a client that only describes a job (grid, code size, the hash of
the weights) starts fast; the networks themselves live in :mod:`nic_models.encoders`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from nic_models.errors import NicError

DIHEDRAL_SUFFIX = "+dihedral"
"""An encoder name ending in this averages the codes of the 8 rotations/flips of each patch."""

# Per-channel (mean, std) applied to x / 255. "nic" is the authors' x / 255 * 2 - 1.
NORMALISATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "nic": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    # Google's EfficientNet-Lite builder: (x - 127) / 128 on 0..255 (MEAN_RGB / STDDEV_RGB)
    "efficientnet-lite": ((127 / 255,) * 3, (128 / 255,) * 3),
}


def normalisation_mean_std(normalisation) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for a normalisation name or an explicit ``(mean, std)`` pair (on x / 255)."""
    if isinstance(normalisation, str):
        if normalisation not in NORMALISATIONS:
            raise NicError(
                f"unknown normalisation {normalisation!r}: use one of {sorted(NORMALISATIONS)} "
                "or an explicit (mean, std) pair on the 0..1 scale"
            )
        return NORMALISATIONS[normalisation]
    mean, std = normalisation
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder expects and produces.

    ``normalisation``: a name in ``nic_models.encoders.NORMALISATIONS`` ("nic": x/255*2-1,
    "imagenet": ImageNet mean/std) or an explicit ``((mean,)*3, (std,)*3)`` on the 0..1 scale.
    ``weights``: default local weights file (None: the user must pass ``weights=``);
    ``weights_sha256``: expected sha256 of that default file, checked on load.
    """

    name: str
    patch_size: int
    stride: int
    mpp: float
    code_dim: int
    normalisation: str | tuple = "nic"
    licence: str = ""
    source: str = ""
    citation: str = ""
    weights: str | None = None
    weights_sha256: str | None = None
    architecture: str = ""
    weights_hint: str = ""
    """Where to get the weights when they are missing (one line, shown in the error)."""
    input_size: int | None = None
    """Side of the network input when it differs from ``patch_size`` (the patch is resized, or
    centre-cropped when ``input_crop``, to it inside the encoder); None: the patch as it is."""
    input_resize: str = "bilinear"
    """Interpolation of that resize (``bilinear``/``bicubic``, antialiased)."""
    input_crop: bool = False
    allowed_extra_keys: tuple[str, ...] = ()
    """Key prefixes a weights file may hold that the network does not use (a classifier head
    dropped from a trunk, e.g. ``("fc.", "head.")``); any other unused key refuses the file."""
    hf_repo: str = ""
    """Hugging Face repository id the weights are published under (looked up in the local cache)."""
    weight_files: tuple[str, ...] = ()
    """File names, in order of preference, of the weights inside a snapshot of ``hf_repo``."""
    params: int | None = None
    """Parameter count of the network (None: not recorded)."""
    commercial: bool | None = None
    """Whether the weights' licence allows commercial use (None: that of your own file)."""
    gated: bool | None = None
    """Whether the weights sit behind an access request on Hugging Face."""
    feature: str = ""
    """What the code is: ``cls`` (class token), ``cls+mean`` (class token concatenated with the mean
    of the patch tokens, register tokens excluded), ``pooled`` (global average pool)."""

    @property
    def network_input(self) -> int:
        """Side in pixels of what the network itself sees."""
        return self.input_size or self.patch_size
