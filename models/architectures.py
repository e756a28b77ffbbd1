"""Architecture names a model card or a preset may use, and the lazy builders behind them.

No torch here: a builder imports its module (:mod:`nic_models.encoders`,
:mod:`nic_models.presets_nets`, ...) on its first call, so the registry and a client that only
reads specs never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from importlib import import_module
from typing import TYPE_CHECKING, Callable

from nic_models.errors import NicError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

TIMM_PREFIX = "timm:"
CARD_KWARG_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class _Builder:
    """A network builder, imported on its first call (picklable: Dask ships it to workers)."""

    function: str

    module: str = "nic_models.encoders"

    def __call__(self, *args, **kwargs) -> nn.Module:
        return getattr(import_module(self.module), self.function)(*args, **kwargs)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "nic-cnn": _Builder("build_nic_cnn"),
    "resnet50-trunc": _Builder("build_resnet50_trunc"),
    "efficientnet-lite": _Builder("build_efficientnet_lite", "nic_models.efficientnet_lite"),
    "token-vit": _Builder("build_token_vit", "nic_models.presets_nets"),
    "unavailable": _Builder("build_unavailable", "nic_models.presets_nets"),
}
"""Architectures a card or preset may name (add more with :func:`register_architecture`)."""
build_timm = _Builder("build_timm")


def resolve_architecture(architecture: str, **kwargs) -> Callable[[], nn.Module]:
    """A zero-argument factory for an architecture named in a card.

    Cards are data, never code: ``architecture`` is a registered name (:data:`ARCHITECTURES`) or
    ``timm:<name>``, and its keyword arguments are plain numbers, strings and booleans. A new
    architecture is added in Python, with :func:`register_architecture`, not through a card.
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
