"""Supervised multitask NIC: one shared encoder trunk, one linear head per task.

The idea of Tellez et al. (MIDL 2020, "Extending Unsupervised Neural Image Compression With
Supervised Multitask Learning"): train the NIC patch encoder on several labelled histopathology
tasks at once, each task with its own small head on the shared 128-d code, so that the code
carries what all tasks need and transfers to new ones. Only the trunk (an
:class:`nic_models.encoders.Encoder`) is kept for compression; the heads are saved beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from nic_models.errors import NicError


@dataclass(frozen=True)
class HeadSpec:
    """A task head: ``kind`` is "classification" (``n_out`` classes) or "regression" (``n_out`` 1)."""

    name: str
    kind: str
    n_out: int


class MultiTaskNet(nn.Module):
    """Shared encoder (uint8 NHWC in, codes out) + one linear head per task."""

    def __init__(self, encoder: nn.Module, heads: list[HeadSpec]):
        super().__init__()
        self.encoder = encoder
        code_dim = int(encoder.spec.code_dim)
        self.head_specs = {h.name: h for h in heads}
        self.heads = nn.ModuleDict({h.name: nn.Linear(code_dim, h.n_out) for h in heads})

    def forward(self, patches: torch.Tensor, task: str | None = None):
        """Codes and head outputs: ``(codes, {task: logits_or_value})`` (one task if ``task``)."""
        codes = self.encoder(patches)
        names = [task] if task is not None else list(self.heads)
        return codes, {name: self.heads[name](codes) for name in names}


def task_loss(spec: HeadSpec, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification, mean squared error for (standardised) regression."""
    if spec.kind == "classification":
        return F.cross_entropy(output, target.long())
    if spec.kind == "regression":
        return F.mse_loss(output.squeeze(1), target.float())
    raise NicError(f"task {spec.name!r}: unknown head kind {spec.kind!r}")


def nic_cnn_kwargs(net: nn.Module, patch_size: int) -> dict:
    """The ``NicCNN`` constructor arguments of a built network (for the model card)."""
    pool = getattr(net.pool, "kernel_size", 1)
    pool = pool[0] if isinstance(pool, (tuple, list)) else int(pool)
    channels = net.dense.in_features
    blocks = len(net.blocks)
    size = patch_size // max(pool, 1)
    for _ in range(blocks):
        size = (size - 3) // 2 + 1
    return {"patch_size": patch_size, "input_pool": pool, "channels": channels // (size * size),
            "n_blocks": blocks, "code_dim": net.dense.out_features}


def card_architecture(net: nn.Module, patch_size: int) -> tuple[str, dict]:
    """The registry architecture and its keyword arguments that rebuild ``net`` (for the model card)."""
    if hasattr(net, "architecture_kwargs"):  # EfficientNet-Lite (nic_models.efficientnet_lite.LiteCode)
        return "efficientnet-lite", net.architecture_kwargs()
    if hasattr(net, "blocks") and hasattr(net, "dense"):
        return "nic-cnn", nic_cnn_kwargs(net, patch_size)
    raise NicError(f"no card architecture for a {type(net).__name__}: train a NIC CNN or an EfficientNet-Lite")


NORMALISATION_NOTES = {
    "nic": "x / 255 * 2 - 1 on uint8 RGB, then 2x2 average pooling (inside the model)",
    "efficientnet-lite": "(x - 127) / 128 on uint8 RGB (Google's EfficientNet-Lite builder), inside the model",
}


def with_projection(encoder, code_dim: int, patch_size: int, mpp: float):
    """``encoder`` (a pooled EfficientNet-Lite) with a new linear projection to ``code_dim``, at the
    training geometry: an ImageNet trunk becomes a ``code_dim``-d encoder on the NIC grid."""
    from dataclasses import replace

    from nic_models.encoders import Encoder

    if not hasattr(encoder.net, "project"):
        raise NicError(f"code_dim {code_dim}: encoder {encoder.spec.name!r} has {encoder.spec.code_dim}-d codes "
                       "and no projection to add (only EfficientNet-Lite trunks take one)")
    encoder.net.project(code_dim)
    spec = replace(encoder.spec, code_dim=code_dim, patch_size=patch_size, stride=patch_size, mpp=mpp)
    return Encoder(encoder.net, spec, encoder.weights_sha256)


def head_state(model: MultiTaskNet) -> dict[str, torch.Tensor]:
    """The heads' tensors, keyed ``<task>.weight`` / ``<task>.bias`` (saved beside the trunk)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
