"""Patch encoder networks and the :class:`Encoder` wrapper the pipeline runs.

An :class:`Encoder` takes raw decoded pixels, a uint8 NHWC batch ``(N, P, P, 3)``, on any
device, and returns ``(N, code_dim)`` float codes. Input scaling and any fixed pre-processing
(NIC's 2x2 average pooling) live inside the network, so workers pass decoded pixels straight in.

Architectures here:

* :class:`NicCNN`: the NIC patch encoder of Tellez et al. (TPAMI 2019, MIDL 2020): 2x2 average
  pooling (128 px at 0.5 µm/px -> 64 px), four [3x3 conv stride 2 valid, LeakyReLU(0.2),
  BatchNorm(eps 1e-3)] blocks of 128 filters, flatten, dense to a 128-d code.
* :func:`build_resnet50_trunc`: ResNet50 cut after ``layer3`` + global average pooling (1024-d).
* :func:`build_timm`: any timm architecture with its classifier removed (pooled features).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from nic_models.dihedral import dihedral_views

from nic_models.errors import NicError
from nic_models.specs import DIHEDRAL_SUFFIX, EncoderSpec, file_sha256, normalisation_mean_std

__all__ = ["NicCNN", "Encoder", "DihedralMean", "build_nic_cnn", "build_resnet50_trunc", "build_timm",
           "load_weights", "read_state_dict", "assemble_encoder", "timm_code_dim", "file_sha256"]

# --------------------------------------------------------------------------- architectures


class NicBlock(nn.Module):
    """3x3 conv (stride 2, valid) -> LeakyReLU(0.2) -> BatchNorm(eps 1e-3), Keras order."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=0)
        self.act = nn.LeakyReLU(0.2)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.2)  # Keras momentum 0.8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.act(self.conv(x)))


class NicCNN(nn.Module):
    """The NIC patch encoder (float NCHW, already normalised) -> (N, code_dim).

    ``input_pool=2`` averages 2x2 pixels first, as the authors do for 128 px patches at 0.5 µm/px.
    The dense layer takes a channels-first flatten (converted Keras weights have their rows
    reordered accordingly, see scripts/convert_tellez_h5.py).
    """

    def __init__(self, patch_size: int = 128, input_pool: int = 2, channels: int = 128,
                 n_blocks: int = 4, code_dim: int = 128):
        super().__init__()
        self.pool = nn.AvgPool2d(input_pool) if input_pool > 1 else nn.Identity()
        blocks, size, c_in = [], patch_size // max(input_pool, 1), 3
        for _ in range(n_blocks):
            blocks.append(NicBlock(c_in, channels))
            size, c_in = (size - 3) // 2 + 1, channels
        if size < 1:
            raise NicError(f"NicCNN: patch_size {patch_size} is too small for {n_blocks} blocks")
        self.blocks = nn.Sequential(*blocks)
        self.dense = nn.Linear(channels * size * size, code_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.pool(x))
        return self.dense(torch.flatten(x, 1))


class PooledFeatures(nn.Module):
    """Global-average-pool the last map of a timm ``features_only`` network."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)[-1].mean(dim=(2, 3))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accept plain ResNet keys (``conv1.weight``) as well as ``trunk.conv1.weight``."""
        if not any(k.startswith("trunk.") for k in state_dict):
            state_dict = {f"trunk.{k}": v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_nic_cnn(**kwargs) -> nn.Module:
    """Factory for :class:`NicCNN` (random init; weights are loaded by the registry)."""
    return NicCNN(**kwargs)


def build_resnet50_trunc() -> nn.Module:
    """ResNet50 up to ``layer3`` (stride 16, 1024 channels) + global average pooling.

    Built by timm with ``pretrained=False``: nothing is downloaded.
    """
    import timm

    trunk = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,))
    return PooledFeatures(trunk)


def build_timm(architecture: str, **kwargs) -> nn.Module:
    """Any timm architecture, classifier removed (``num_classes=0``): pooled features."""
    import timm

    if not timm.is_model(architecture):
        raise NicError(f"unknown timm architecture {architecture!r} (see timm.list_models())")
    kwargs.setdefault("num_classes", 0)
    return timm.create_model(architecture, pretrained=False, **kwargs)


# --------------------------------------------------------------------------- weights


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local ``.safetensors`` file or a ``torch.save`` file (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise NicError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except NicError:
        raise
    except Exception as exc:  # unreadable / unsafe pickle / truncated file
        raise NicError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NicError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _allowed(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether an unused key of a file is one the entry names as droppable (matched with or
    without a wrapper's ``trunk.`` prefix)."""
    return any(key.startswith(p) or key.removeprefix("trunk.").startswith(p) for p in prefixes)


def load_weights(net: nn.Module, path: str | Path, name: str, allowed_extra: tuple[str, ...] = ()) -> None:
    """Load a weights file into ``net`` strictly.

    Every parameter and persistent buffer of the network must be in the file, and every key of the
    file must be used, except keys under the prefixes in ``allowed_extra`` (named per entry: a
    classifier head dropped from a trunk, ``fc.``/``head.``/``_fc.``/``classifier.``, and for
    ``resnet50-trunc`` the ``layer4.`` it cuts). Anything else refuses the file with the list of
    keys: a key silently dropped (e.g. LayerScale's ``ls1.gamma`` when the network was built without
    ``init_values``) would give codes that are silently wrong.
    """
    state = read_state_dict(path)
    try:
        result = net.load_state_dict(state, strict=False)
    except NicError:
        raise
    except RuntimeError as exc:  # shape mismatch
        raise NicError(f"{path}: weights do not fit encoder {name!r}: {exc}") from exc
    unused = sorted(k for k in result.unexpected_keys if not _allowed(k, allowed_extra))
    missing = sorted(k for k in result.missing_keys if not k.endswith("num_batches_tracked"))
    if unused or missing:
        parts = []
        if unused:
            parts.append(f"{len(unused)} keys of the file that the network does not use: {_listing(unused)}")
        if missing:
            parts.append(f"{len(missing)} parameters the file lacks: {_listing(missing)}")
        raise NicError(
            f"{path}: weights do not fit encoder {name!r} ({'; '.join(parts)}). Is it the right architecture "
            "and keyword arguments (e.g. init_values for LayerScale, reg_tokens)? A preset of "
            "`nic encoders` declares them"
        )


def _listing(keys: list[str], limit: int = 12) -> str:
    keys = [k.removeprefix("trunk.") for k in keys]
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --------------------------------------------------------------------------- wrapper


class Encoder(nn.Module):
    """Raw-pixel patch encoder: uint8 NHWC ``(N, P, P, 3)`` -> float ``(N, code_dim)``.

    ``spec`` says what it expects (patch size, µm/px, stride, code size); ``weights_sha256``
    names the weights (file sha256, or ``random-init-seed<N>``). Created in eval mode.
    """

    def __init__(self, net: nn.Module, spec: EncoderSpec, weights_sha256: str):
        super().__init__()
        self.net = net
        self.spec = spec
        self.weights_sha256 = weights_sha256
        mean, std = normalisation_mean_std(spec.normalisation)
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1),
                             persistent=False)
        self.eval()

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}, weights_sha256={self.weights_sha256[:16]!r}"

    def preprocess(self, patches) -> torch.Tensor:
        """uint8 NHWC pixels (torch, numpy, or CUDA array) -> normalised float NCHW on the model's device."""
        patches = as_tensor(patches)
        p = self.spec.patch_size
        if patches.ndim != 4 or tuple(patches.shape[1:]) != (p, p, 3):
            raise NicError(
                f"encoder {self.spec.name!r} takes (N, {p}, {p}, 3) uint8 pixels, got {tuple(patches.shape)}"
            )
        x = patches.to(device=self.scale.device).permute(0, 3, 1, 2).to(self.scale.dtype)
        size = self.spec.input_size
        if size and size != p:
            if self.spec.input_crop:  # centre crop (e.g. GigaPath: 256 px -> 224 px)
                top = (p - size) // 2
                x = x[:, :, top:top + size, top:top + size]
            else:  # torchvision's Resize on a tensor: antialiased, no corner alignment
                x = torch.nn.functional.interpolate(x, size=(size, size), mode=self.spec.input_resize,
                                                    align_corners=False, antialias=True)
        return x * self.scale - self.shift

    def forward(self, patches) -> torch.Tensor:
        return self.net(self.preprocess(patches))


def as_tensor(patches) -> torch.Tensor:
    """A torch view of numpy (copied if read-only) or CUDA-array (CuPy) pixels; tensors pass through."""
    if isinstance(patches, torch.Tensor):
        return patches
    if isinstance(patches, np.ndarray):
        return torch.from_numpy(patches if patches.flags.writeable else patches.copy())
    return torch.as_tensor(patches)  # __cuda_array_interface__ (CuPy): zero-copy on the GPU


class DihedralMean(Encoder):
    """Mean of the codes of the 8 rotations/flips of each patch: a flip/rotation-invariant code."""

    def __init__(self, encoder: Encoder):
        from dataclasses import replace

        nn.Module.__init__(self)  # no buffers of its own: the wrapped encoder does the pre-processing
        self.base = encoder
        self.spec = replace(encoder.spec, name=encoder.spec.name + DIHEDRAL_SUFFIX)
        self.weights_sha256 = encoder.weights_sha256
        self.eval()

    def preprocess(self, patches) -> torch.Tensor:
        return self.base.preprocess(patches)

    def forward(self, patches) -> torch.Tensor:
        patches = as_tensor(patches)
        views = dihedral_views(patches, dims=(1, 2))  # NHWC
        n = patches.shape[0]
        codes = self.base(torch.cat(views, dim=0))
        return codes.view(8, n, -1).mean(dim=0)


# --------------------------------------------------------------------------- assembly


def assemble_encoder(factory: Callable[[], nn.Module], spec: EncoderSpec, weights: str | None, weights_sha256: str,
                     seed: int = 0, dihedral_mean: bool = False, device=None) -> Encoder:
    """The network ``factory()`` builds (seeded), its weights loaded from ``weights`` (None: the
    seeded random init), wrapped to take raw pixels, in eval mode on ``device``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = factory()
    if weights is not None:
        load_weights(net, weights, spec.name, spec.allowed_extra_keys)
    encoder: Encoder = Encoder(net, spec, weights_sha256)
    if dihedral_mean:
        encoder = DihedralMean(encoder)
    if device is not None:
        encoder = encoder.to(device)
    return encoder.eval()


def timm_code_dim(factory: Callable[[], nn.Module]) -> int:
    """Feature size of a timm model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        net = factory()
    return int(net.num_features)
