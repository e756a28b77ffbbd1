"""Slide-level models that read compressed slide tensors (the second NIC stage).

* :class:`NicCNN` -- the CNN of Tellez et al. (TPAMI 2019) on crops of the compressed grid.
* :class:`GatedAttentionMIL` -- gated attention pooling over tissue cells (Ilse et al., ICML 2018).
* :class:`PoolingLinear` -- mean / max pooling of the codes, then one linear layer (baselines).

Plus the pieces they share: output
activations per task and the Cox partial-likelihood loss for survival.
All models are plain ``torch.nn.Module`` so they run on CPU and GPU alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.dihedral import dihedral, dihedral_inverse  # noqa: F401  (re-exported for callers)

MODELS = ("nic-cnn", "abmil", "mean", "max")
TASKS = ("binary", "multiclass", "regression", "survival")


def n_outputs_for(task: str, n_classes: int = 2) -> int:
    """Number of output units: one logit/value/risk, or one logit per class for multiclass."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return n_classes if task == "multiclass" else 1


# --------------------------------------------------------------------------- task heads


def scores_from_outputs(task: str, outputs: torch.Tensor) -> torch.Tensor:
    """Raw outputs (n, n_out) -> scores: probabilities for classification, values/risks otherwise."""
    if task == "binary":
        return torch.sigmoid(outputs)
    if task == "multiclass":
        return torch.softmax(outputs, dim=-1)
    return outputs


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events.

    risk: (n,) log-hazard predictions; time: (n,) follow-up; event: (n,) 1 = event, 0 = censored.
    Returns 0 (with a gradient) when the batch holds no event.
    """
    risk = risk.reshape(-1)
    order = torch.argsort(time.reshape(-1), descending=True)
    risk, time, event = risk[order], time.reshape(-1)[order], event.reshape(-1)[order].to(risk.dtype)
    log_cum = torch.logcumsumexp(risk, dim=0)
    # Breslow: tied times share one risk set -> use the cumulative sum at the last tied index.
    _, inverse, counts = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0) - 1
    log_risk_set = log_cum[last][inverse]
    n_events = event.sum()
    return -((risk - log_risk_set) * event).sum() / n_events.clamp(min=1.0)


def task_loss(task: str, outputs: torch.Tensor, target: torch.Tensor, *, time=None, event=None,
              class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of raw outputs (n, n_out) for one task: BCE, CE, MSE or Cox partial likelihood."""
    if task == "binary":
        pos_weight = None if class_weight is None else class_weight[1:2] / class_weight[0:1]
        return F.binary_cross_entropy_with_logits(outputs[:, 0], target.float(), pos_weight=pos_weight)
    if task == "multiclass":
        return F.cross_entropy(outputs, target.long(), weight=class_weight)
    if task == "regression":
        return F.mse_loss(outputs[:, 0], target.float())
    if task == "survival":
        return cox_loss(outputs[:, 0], time, event)
    raise ValueError(f"unknown task {task!r}")


# --------------------------------------------------------------------------- NIC CNN


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
    L2 weight decay is applied by the optimiser (see pipeline.classify).
    """

    def __init__(self, in_channels: int, n_outputs: int, width: int = 128, depth: int = 8,
                 n_strided: int = 6, dropout: float = 0.2, pooling: str = "max", hidden: int = 128,
                 slope: float = 0.2):
        super().__init__()
        if pooling not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean', not {pooling!r}")
        self.pooling = pooling
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


def predict_dihedral(model: nn.Module, crops: torch.Tensor, task: str) -> torch.Tensor:
    """Scores of crops (n, C, H, W) averaged over the 8 rotations/flips -> (n, n_out).

    The 8 transforms go through the model as one batch (the model must be in eval mode, so
    BatchNorm treats samples independently)."""
    n = crops.shape[0]
    if crops.shape[-1] != crops.shape[-2]:  # rotations of a non-square crop change its shape
        return torch.stack([scores_from_outputs(task, model(dihedral(crops, k))) for k in range(8)]).mean(0)
    batch = torch.cat([dihedral(crops, k) for k in range(8)])
    return scores_from_outputs(task, model(batch)).reshape(8, n, -1).mean(0)


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


# --------------------------------------------------------------------------- set models


class GatedAttentionMIL(nn.Module):
    """Gated attention-based MIL pooling (Ilse, Tomczak & Welling 2018) over a bag (n, C).

    a_i = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) ), z = sum_i a_i h_i, output = head(z).
    """

    def __init__(self, in_channels: int, n_outputs: int, embed: int = 128, attention: int = 64,
                 dropout: float = 0.25):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_channels, embed), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(embed, attention)
        self.attn_u = nn.Linear(embed, attention)
        self.attn_w = nn.Linear(attention, 1)
        self.head = nn.Linear(embed, n_outputs)

    def attention(self, bag: torch.Tensor):
        """Embeddings (n, embed) and attention weights (n,) summing to 1."""
        h = self.embed(bag)
        logits = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h)))[:, 0]
        return h, torch.softmax(logits, dim=0)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        h, a = self.attention(bag)
        return self.head(a @ h)[None]  # (1, n_out)


class PoolingLinear(nn.Module):
    """Mean or max pooling of the codes over tissue cells, then a linear (logistic) head."""

    def __init__(self, in_channels: int, n_outputs: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "max"):
            raise ValueError(f"pooling must be 'mean' or 'max', not {pooling!r}")
        self.pooling = pooling
        self.linear = nn.Linear(in_channels, n_outputs)

    def pool(self, bag: torch.Tensor) -> torch.Tensor:
        return bag.mean(0) if self.pooling == "mean" else bag.amax(0)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(bag))[None]  # (1, n_out)

    def contributions(self, bag: torch.Tensor, output_index: int = 0) -> torch.Tensor:
        """Per-cell share of the output (n,): w.x_i for mean pooling (the output is their mean
        plus the bias); for max pooling each channel's term w_c max_c goes to its argmax cell."""
        w = self.linear.weight[output_index]
        if self.pooling == "mean":
            return bag @ w
        idx = bag.argmax(0)
        values = bag.gather(0, idx[None])[0] * w
        return torch.zeros(bag.shape[0], dtype=bag.dtype, device=bag.device).index_add_(0, idx, values)


def build_model(name: str, in_channels: int, n_outputs: int, **params) -> nn.Module:
    """The model ``name`` (one of MODELS) with its hyper-parameters (unknown keys are ignored)."""
    if name == "nic-cnn":
        keys = ("width", "depth", "n_strided", "dropout", "pooling", "hidden")
        return NicCNN(in_channels, n_outputs, **{k: params[k] for k in keys if k in params})
    if name == "abmil":
        keys = ("embed", "attention", "dropout")
        return GatedAttentionMIL(in_channels, n_outputs, **{k: params[k] for k in keys if k in params})
    if name in ("mean", "max"):
        return PoolingLinear(in_channels, n_outputs, pooling=name)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
