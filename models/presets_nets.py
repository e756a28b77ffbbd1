"""The networks behind the foundation-model presets (:mod:`nic_models.presets`), and the key maps
that load a vendor's own file layout into them.

* :class:`TokenFeatures`: a timm Vision Transformer whose code is the class token (``cls``) or
  the class token concatenated with the mean of the patch tokens, register tokens excluded
  (``cls+mean``: Virchow, Virchow2, H0-mini, Midnight).
* Key layouts: ``timm`` (the file is timm's), ``hf-vit`` (Hugging Face ``transformers``
  ``ViTModel``: Phikon) and ``hf-dinov2`` (``Dinov2Model`` / DINOv2 with registers: Phikon-v2,
  Midnight, Hibou), in the layout ``save_pretrained`` wrote before transformers 5 (what the Hub
  holds) or in transformers 5's names. Each map places every key it knows and leaves the rest
  as they are, so strict loading names any key that has no place.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

from nic_models.errors import NicError

FEATURES = ("cls", "cls+mean")


class TokenFeatures(nn.Module):
    """A timm ViT (float NCHW, normalised) -> the code its model card defines."""

    def __init__(self, trunk: nn.Module, feature: str = "cls", key_format: str = "timm"):
        super().__init__()
        if feature not in FEATURES:
            raise NicError(f"unknown feature {feature!r}: one of {FEATURES}")
        if key_format not in KEY_MAPS:
            raise NicError(f"unknown key layout {key_format!r}: one of {sorted(KEY_MAPS)}")
        self.trunk = trunk
        self.feature = feature
        self.key_format = key_format
        self.num_features = int(trunk.num_features) * (2 if feature == "cls+mean" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # final norm applied: (N, prefix + patches, D)
        cls = tokens[:, 0]
        if self.feature == "cls":
            return cls
        return torch.cat([cls, tokens[:, self.trunk.num_prefix_tokens:].mean(dim=1)], dim=-1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a file in this entry's vendor layout (or already in ``trunk.*`` keys)."""
        if not any(k.startswith("trunk.") for k in state_dict):
            state_dict = {f"trunk.{k}": v for k, v in KEY_MAPS[self.key_format](state_dict, self.trunk).items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _layers() -> dict:
    import timm.layers

    return {"swiglu_packed": timm.layers.SwiGLUPacked, "silu": nn.SiLU, "gelu": nn.GELU}


def build_token_vit(architecture: str, feature: str = "cls", key_format: str = "timm",
                    layer_norm_eps: float | None = None, mlp_layer: str | None = None,
                    act_layer: str | None = None, **timm_kwargs) -> TokenFeatures:
    """A timm ViT built from plain data (layer names as strings), classifier removed."""
    import timm

    if not timm.is_model(architecture):
        raise NicError(f"unknown timm architecture {architecture!r}")
    layers = _layers()
    kwargs = dict(timm_kwargs, num_classes=0)
    for key, value in (("mlp_layer", mlp_layer), ("act_layer", act_layer)):
        if value is not None:
            if value not in layers:
                raise NicError(f"unknown {key} {value!r}: one of {sorted(layers)}")
            kwargs[key] = layers[value]
    if layer_norm_eps is not None:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=layer_norm_eps)
    trunk = timm.create_model(architecture, pretrained=False, **kwargs)
    return TokenFeatures(trunk, feature, key_format)


def build_unavailable(reason: str = "", **_) -> nn.Module:
    """Presets whose network timm cannot express here: listed with their facts, never built."""
    raise NicError(f"this encoder cannot be built by this package: {reason}")


# --------------------------------------------------------------------------- vendor key layouts


def _fit_pos_embed(state: dict, trunk: nn.Module) -> dict:
    """A position embedding that includes the class token's row, for a timm trunk that has none
    (``no_embed_class``: the DINOv2-with-registers layout) is folded into ``cls_token``; a grid of
    another size is resampled (bicubic) to the trunk's."""
    pos = state.get("pos_embed")
    if pos is None or not hasattr(trunk, "pos_embed") or pos.shape == trunk.pos_embed.shape:
        return state
    target = trunk.pos_embed.shape[1]
    prefix = 0 if getattr(trunk, "no_embed_class", False) else trunk.num_prefix_tokens
    side = int(round((pos.shape[1] - 1) ** 0.5))
    if getattr(trunk, "no_embed_class", False) and side * side == pos.shape[1] - 1 and "cls_token" in state:
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        pos = pos[:, 1:]
    if pos.shape[1] != target:
        from timm.layers import resample_abs_pos_embed

        grid = trunk.patch_embed.grid_size
        pos = resample_abs_pos_embed(pos, list(grid), num_prefix_tokens=prefix)
    state["pos_embed"] = pos
    return state


_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_BLOCK = {  # transformers <5 and 5 names inside a layer -> timm names inside a block
    "layernorm_before": "norm1", "layernorm_after": "norm2", "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2",
    "mlp.down_proj": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
        "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_GLU = {"mlp.gate_proj": "gate", "mlp.up_proj": "up"}  # transformers 5 splits SwiGLU's packed fc1
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
DROPPED_BY_MAP = ("embeddings.mask_token",)
"""The masked-image-modelling token of DINOv2 / iBOT pre-training: no part of inference."""


def hf_to_timm(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Hugging Face ``ViTModel`` / ``Dinov2Model`` keys -> timm ``VisionTransformer`` keys."""
    out, parts = {}, {}
    for key, value in state.items():
        if key in DROPPED_BY_MAP:
            continue
        if key in _EMBEDDINGS:
            out[_EMBEDDINGS[key]] = value
            continue
        match = _LAYER.match(key)
        if match:
            i, inner, kind = match.groups()
            if kind == "lambda1" and f"{inner}.lambda1" in _BLOCK:  # LayerScale: a bare parameter
                out[f"blocks.{i}.{_BLOCK[inner + '.lambda1']}"] = value
                continue
            if inner in _QKV or inner in _GLU:
                parts.setdefault((i, "qkv" if inner in _QKV else "glu", kind), {})[
                    (_QKV | _GLU)[inner]] = value
                continue
            if inner in _BLOCK:
                out[f"blocks.{i}.{_BLOCK[inner]}.{kind}"] = value
                continue
        out[key] = value  # no place: strict loading names it
    for (i, group, kind), pieces in parts.items():
        order = ("q", "k", "v") if group == "qkv" else ("gate", "up")
        lacking = [p for p in order if p not in pieces]
        if lacking:
            raise NicError(f"layer {i}: the file lacks the {lacking} projection(s) of its {group}")
        name = "attn.qkv" if group == "qkv" else "mlp.fc1"
        out[f"blocks.{i}.{name}.{kind}"] = torch.cat([pieces[p] for p in order], dim=0)
    return _fit_pos_embed(out, trunk)


def timm_keys(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """A timm file: only the position embedding may need fitting."""
    return _fit_pos_embed(dict(state), trunk)


KEY_MAPS = {"timm": timm_keys, "hf-vit": hf_to_timm, "hf-dinov2": hf_to_timm}
