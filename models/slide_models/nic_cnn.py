"""nic-cnn: the CNN of Tellez et al. (TPAMI 2019) on crops of the compressed grid.

Reads grid crops; scores are averaged over the 8 rotations/flips and over a tiling of crops;
explains itself by Grad-CAM (:meth:`NicCNN.relevance`).
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
    L2 weight decay is applied by the optimiser (see nic_pipeline.classify). Grad-CAM of
    :meth:`relevance` is taken at block ``cam_layer`` (HiResCAM when ``cam_hires``).
    """

    def __init__(self, in_channels: int, n_outputs: int, width: int = 128, depth: int = 8,
                 n_strided: int = 6, dropout: float = 0.2, pooling: str = "max", hidden: int = 128,
                 slope: float = 0.2, cam_layer: int = 1, cam_hires: bool = False):
        super().__init__()
        if pooling not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean', not {pooling!r}")
        self.pooling = pooling
        self.cam_layer, self.cam_hires = cam_layer, cam_hires
        chans = [in_channels] + [width] * depth
        self.blocks = nn.ModuleList(
            SeparableBlock(chans[i], chans[i + 1], 2 if i < n_strided else 1, dropout, slope)
            for i in range(depth)
        )
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.LeakyReLU(slope), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_outputs))

    def trunk(self, x: torch.Tensor, keep: int | None = None):
        """Run the conv blocks; also return the activation after block ``keep`` (for Grad-CAM)."""
        kept = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if keep is not None and i == keep % len(self.blocks):
                kept = x
        return x, kept

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
                  cam_hires=False),
    scores="mean over a tiling of crops of the mean over 8 rotations/flips",
    explanation="grad-cam",
    description="the CNN of Tellez et al. 2019 on crops of the compressed grid")
def build_nic_cnn(in_channels: int, n_outputs: int, width=128, depth=8, n_strided=6, dropout=0.2,
                  pooling="max", hidden=128, cam_layer=1, cam_hires=False, **_) -> NicCNN:
    return NicCNN(in_channels, n_outputs, width=width, depth=depth, n_strided=n_strided, dropout=dropout,
                  pooling=pooling, hidden=hidden, cam_layer=cam_layer, cam_hires=cam_hires)
