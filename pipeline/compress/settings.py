"""How to build and run the encoder on a worker: small, picklable, and free of torch, so the
client, the graph and the worker-side runner (:mod:`nic_pipeline.compress.codes`) all import it
without importing each other."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


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
    def key(self) -> str:
        """The same on the client and every worker (``hash()`` is salted per process)."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]
