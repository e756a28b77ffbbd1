"""nic-cnn: the CNN of Tellez et al. (TPAMI 2019) on crops of the compressed grid.

Reads grid crops; scores are averaged over the 8 rotations/flips and over a tiling of crops;
explains itself by Grad-CAM (:meth:`NicCNN.relevance`). Codes wider than ``reduce`` channels
(foundation encoders: 1,024-3,072) are first mapped to ``reduce`` channels by a 1x1 convolution,
so the network after it is the paper's whatever the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nic_models.dihedral import dihedral, dihedral_inverse
from nic_models.slide_models.registry import register_slide_model

class SeparableBlock(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 convolution, BatchNorm, LeakyReLU, channel dropout."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float, slope: float = 0.2):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.LeakyReLU(slope)
        self.drop = nn.Dropout2d(dropout)  # feature-wise (whole-channel) dropout

    def forward(self, x):
        return self.drop(self.act(self.bn(self.pointwise(self.depthwise(x)))))


class NicCNN(nn.Module):
    """The NIC slide classifier (Tellez et al. 2019) on compressed grids (n, C, H, W).

    ``depth`` depthwise-separable 3x3 blocks of ``width`` filters, stride 2 on the first
    ``n_strided``; global ``pooling`` ("max" or "mean"); dense layer of ``hidden``; output.
    When the codes have more than ``reduce`` channels (``in_channels`` - 1, the tissue fraction
    being the last), a 1x1 convolution + BatchNorm + LeakyReLU first maps the codes to ``reduce``
    channels and the tissue fraction passes beside them (``reduce=0``: never).
    L2 weight decay is applied by the optimiser (see nic_pipeline.classify). Grad-CAM of
    :meth:`relevance` is taken at block ``cam_layer`` (HiResCAM when ``cam_hires``).
    """

    def __init__(self, in_channels: int, n_outputs: int, width: int = 128, depth: int = 8,
                 n_strided: int = 6, dropout: float = 0.2, pooling: str = "max", hidden: int = 128,
                 slope: float = 0.2, cam_layer: int = 1, cam_hires: bool = False, reduce: int = 128):
        super().__init__()
        if pooling not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean', not {pooling!r}")
        self.pooling = pooling
        self.cam_layer, self.cam_hires = cam_layer, cam_hires
        self.reduce = None
        if reduce and in_channels - 1 > reduce:
            self.reduce = nn.Sequential(nn.Conv2d(in_channels - 1, reduce, 1, bias=False), nn.BatchNorm2d(reduce),
                                        nn.LeakyReLU(slope))
        self.in_channels, self.slope = in_channels, slope
        chans = [reduce + 1 if self.reduce is not None else in_channels] + [width] * depth
        self.blocks = nn.ModuleList(
            SeparableBlock(chans[i], chans[i + 1], 2 if i < n_strided else 1, dropout, slope)
            for i in range(depth)
        )
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.LeakyReLU(slope), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_outputs))

    def trunk(self, x: torch.Tensor, keep: int | None = None):
        """Run the conv blocks; also return the activation after block ``keep`` (for Grad-CAM)."""
        kept = None
        if self.reduce is not None:
            x = torch.cat([self.reduce(x[:, :-1]), x[:, -1:]], dim=1)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if keep is not None and i == keep % len(self.blocks):
                kept = x
        return x, kept

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also loads a model saved before channel reduction existed (no ``reduce.*`` keys): its
        first block then reads the codes directly, as it was trained."""
        if self.reduce is not None and not any(k.startswith("reduce.") for k in state_dict):
            first = self.blocks[0]
            self.reduce = None
            self.blocks[0] = SeparableBlock(self.in_channels, first.pointwise.out_channels, first.depthwise.stride[0],
                                            first.drop.p, self.slope)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def head_from_maps(self, maps: torch.Tensor) -> torch.Tensor:
        pooled = maps.amax(dim=(-2, -1)) if self.pooling == "max" else maps.mean(dim=(-2, -1))
        return self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps, _ = self.trunk(x)
        return self.head_from_maps(maps)

    def relevance(self, crop: torch.Tensor, output_index: int = 0) -> torch.Tensor:
        """Per-cell relevance (H, W) of one crop (C, H, W): Grad-CAM, see :func:`grad_cam`."""
        return grad_cam(self, crop, self.cam_layer, output_index, hires=self.cam_hires)


def grad_cam(model: NicCNN, crop: torch.Tensor, layer: int, output_index: int = 0,
             hires: bool = False) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of one crop (C, H, W) at conv block ``layer``, averaged
    over the 8 rotations/flips, upsampled to (H, W). ``hires`` uses gradient x activation
    per position (HiResCAM) instead of channel-averaged gradients. Eval mode expected."""
    x = torch.stack([dihedral(crop, k) for k in range(8)])
    with torch.enable_grad():
        maps, kept = model.trunk(x, keep=layer)
        out = model.head_from_maps(maps)[:, output_index]
        (grad,) = torch.autograd.grad(out.sum(), kept)  # samples are independent in eval mode
    weights = grad if hires else grad.mean(dim=(-2, -1), keepdim=True)
    cam = F.relu((weights * kept).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return torch.stack([dihedral_inverse(cam[k], k) for k in range(8)]).mean(0).detach()


@register_slide_model(
    "nic-cnn", input="grid",
    defaults=dict(crop=128, steps=2000, batch_size=16, lr=1e-3, lr_final_ratio=0.01, weight_decay=1e-5,
                  dropout=0.2, width=128, depth=8, n_strided=6, pooling="max", hidden=128, cam_layer=1,
                  cam_hires=False, reduce=128),
    scores="mean over a tiling of crops of the mean over 8 rotations/flips",
    explanation="grad-cam",
    description="the CNN of Tellez et al. 2019 on crops of the compressed grid")
def build_nic_cnn(in_channels: int, n_outputs: int, width=128, depth=8, n_strided=6, dropout=0.2,
                  pooling="max", hidden=128, cam_layer=1, cam_hires=False, reduce=128, **_) -> NicCNN:
    return NicCNN(in_channels, n_outputs, width=width, depth=depth, n_strided=n_strided, dropout=dropout,
                  pooling=pooling, hidden=hidden, cam_layer=cam_layer, cam_hires=cam_hires, reduce=reduce)
