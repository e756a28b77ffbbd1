"""Model cards: the JSON file beside a safetensors file that says what the encoder is.

:func:`read_card` turns a card into a spec and a network factory; :func:`save_encoder` writes the
safetensors + card pair of a trained network. A card is data and never names code to import (its
``architecture`` is a name of :data:`nic_models.architectures.ARCHITECTURES` or ``timm:<name>``).
No torch at import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from nic_models.architectures import resolve_architecture
from nic_models.errors import NicError
from nic_models.licences import card_licence_text
from nic_models.specs import EncoderSpec, file_sha256

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

REQUIRED = ("name", "architecture", "patch_size", "mpp", "code_dim", "normalisation")


def card_licence(licence) -> str:
    """The licence of a card, whole: a string, or ``{"spdx", "weights", "copyright", "file", "data"}``
    (:func:`nic_models.licences.card_licence_text`)."""
    return card_licence_text(licence)


def read_card(path: str | Path) -> tuple[EncoderSpec, Callable[[], nn.Module], list[str]]:
    """Spec, factory and aliases described by a JSON model card (weights path relative to the card)."""
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NicError(f"{path}: cannot read model card ({exc})") from exc
    lacking = [k for k in REQUIRED if k not in card]
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
    spec = EncoderSpec(
        name=card["name"], patch_size=int(card["patch_size"]),
        stride=int(card.get("stride", card["patch_size"])), mpp=float(card["mpp"]),
        code_dim=int(card["code_dim"]), normalisation=norm, licence=card_licence(card.get("licence", "")),
        source=source, citation=card.get("citation", ""), weights=weights,
        weights_sha256=card.get("weights_sha256"), architecture=card["architecture"],
        allowed_extra_keys=tuple(card.get("allowed_extra_keys", ())),
        params=card.get("params"), commercial=card.get("commercial"), gated=card.get("gated"),
        hf_repo=card.get("hf_repo", ""),
    )
    factory = resolve_architecture(card["architecture"], **card.get("architecture_kwargs", {}))
    return spec, factory, list(card.get("aliases", []))


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
        from nic_models.registry import register_from_card

        register_from_card(card_path, overwrite=overwrite)
    return card_path
