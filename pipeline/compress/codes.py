"""Codes from patches: the encoder built from the registry on this process's device, run in
batches at the precision its hardware allows. The one encoder runner: ``nic compress`` (on the
workers) and ``nic embed`` (:func:`nic_pipeline.encoder.tiles.embed_tiles`) both encode through
:func:`encode_patches`, at a precision from :func:`nic_pipeline.runtime.device.resolve_precision`.

The only compression module that imports torch; the worker side loads it when a worker first
needs an encoder (:meth:`nic_pipeline.compress.encode.NicWorker.encoder`), and the client never does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nic_models.registry import create_encoder
from nic_pipeline.compress.settings import EncoderSettings
from nic_pipeline.runtime.device import autocast, resolve_device, resolve_precision


def default_batch_size(patch_size: int) -> int:
    """256 patches of 128 px, scaled by area for larger patches (64 of 224 px): activations of a
    batch stay around the same few hundred MB whatever the encoder."""
    return max(16, int(256 * (128 / patch_size) ** 2) // 16 * 16)


def build_encoder(settings: EncoderSettings, device: str):
    """Create the encoder from the registry, in eval mode on ``device``."""
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


def encode_patches(encoder, patches, precision: str = "auto", batch_size: int = 256) -> np.ndarray:
    """Codes (n, code_dim) float16 of uint8 NHWC patches (NumPy or CuPy), in batches, at
    ``precision`` (``auto``: what this process's hardware allows).

    The encoder takes the arrays as they are (CuPy zero-copy on the GPU) and normalises inside.
    """
    device = next(encoder.parameters()).device
    precision = resolve_precision(precision, device.type)
    codes = []
    with torch.inference_mode(), autocast(device.type, precision):
        for start in range(0, len(patches), batch_size):
            codes.append(encoder(patches[start : start + batch_size]).float().cpu().numpy())
    if not codes:
        return np.zeros((0, encoder.spec.code_dim), np.float16)
    return np.concatenate(codes).astype(np.float16)


@dataclass
class LoadedEncoder:
    """An encoder on this worker, with the device and precision it runs at."""

    module: torch.nn.Module
    device: str
    precision: str
    batch_size: int

    def encode(self, patches) -> np.ndarray:
        return encode_patches(self.module, patches, self.precision, self.batch_size)


def load_encoder(settings: EncoderSettings, nthreads: int = 1) -> LoadedEncoder:
    """The encoder for ``settings`` on this worker's device, at the precision its hardware allows,
    using ``nthreads`` CPU threads when it runs on the CPU."""
    device = resolve_device(settings.device)
    if device == "cpu":
        torch.set_num_threads(nthreads)
    module = build_encoder(settings, device)
    return LoadedEncoder(module, device, resolve_precision(settings.precision, device),
                         settings.batch_size or default_batch_size(module.spec.patch_size))
