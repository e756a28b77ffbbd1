"""transmil: TransMIL (Shao et al., NeurIPS 2021), after the authors' ``TransMIL.py``.

The cells' codes are embedded (Linear + ReLU to ``dim``), the sequence is padded to a square
number by repeating its first cells, a class token is prepended, then: a Nystrom self-attention
layer, the PPEG positional encoding (depth-wise 7/5/3 convolutions on the tokens reshaped to a
square), a second Nystrom layer, LayerNorm, and a linear head on the class token.

PPEG reads the paper's square reshaping of the sequence, not the cells' positions on the slide
grid: a bag is the codes of the tissue cells alone (the registry's bag contract, shared by every
head and by training, which sub-samples large bags), the paper's results come from this reshaping,
and the cells arrive in raster order (``SlideSource.bag``; the training sub-sample keeps it), so
a row of the square is a run of cells that neighbour along slide rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nic_models.slide_models.registry import register_slide_model


def iterative_pinv(x: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of (..., m, m) by the iteration Nystromformer uses (Razavi et al. 2014)."""
    z = x.transpose(-1, -2) / (x.abs().sum(-1).max() * x.abs().sum(-2).max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nystrom approximation (Xiong et al., AAAI 2021), as in the
    ``nystrom-attention`` package TransMIL uses. The sequence is zero-padded at the front to a
    multiple of ``landmarks`` (fewer landmarks than tokens: a shorter sequence is its own landmarks,
    where the package would pad it with zero tokens that draw attention); landmarks are means of
    consecutive segments of queries and keys;
    softmax(QK^T)V ~ softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V, plus a depth-wise
    convolution of the values along the sequence (kernel 33) as a residual."""

    def __init__(self, dim: int, heads: int = 8, landmarks: int = 256, pinv_iterations: int = 6,
                 residual_kernel: int = 33, dropout: float = 0.1):
        super().__init__()
        self.heads, self.landmarks, self.pinv_iterations = heads, landmarks, pinv_iterations
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.residual = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def forward(self, x: torch.Tensor, query: int | None = None):
        """(b, n, dim) -> (b, n, dim); with ``query``, also that token's attention over the n tokens (b, heads, n)."""
        n = x.shape[1]
        m = min(self.landmarks, n)  # a short sequence is its own landmarks (exact attention)
        x = F.pad(x, (0, 0, (-n) % m, 0))
        b, padded, dim = x.shape
        q, k, v = (t.reshape(b, padded, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        q = q * self.scale
        q_land, k_land = (t.reshape(b, self.heads, m, padded // m, -1).mean(3) for t in (q, k))
        left = torch.softmax(q @ k_land.transpose(-1, -2), -1) @ iterative_pinv(
            torch.softmax(q_land @ k_land.transpose(-1, -2), -1), self.pinv_iterations)
        right = torch.softmax(q_land @ k.transpose(-1, -2), -1)
        out = left @ (right @ v) + self.residual(v)
        out = self.out(out.transpose(1, 2).reshape(b, padded, dim))[:, -n:]
        if query is None:
            return out
        row = padded - n + query
        return out, (left[:, :, row:row + 1] @ right)[:, :, 0, -n:]


class PPEG(nn.Module):
    """Pyramid position encoding generator: identity + depth-wise 7x7, 5x5 and 3x3 convolutions of
    the instance tokens on a (side, side) square; the class token passes through."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, dim = x.shape
        grid = x[:, 1:].transpose(1, 2).reshape(b, dim, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([x[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


class TransLayer(nn.Module):
    """Pre-norm residual Nystrom attention: x + attention(LayerNorm(x))."""

    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, heads=heads, landmarks=landmarks, dropout=dropout)

    def forward(self, x: torch.Tensor, query: int | None = None):
        if query is None:
            return x + self.attention(self.norm(x))
        out, attention = self.attention(self.norm(x), query)
        return x + out, attention


class TransMIL(nn.Module):
    """TransMIL over a bag (n, C) -> (1, n_out) (see the module docstring)."""

    def __init__(self, in_channels: int, n_outputs: int, dim: int = 512, heads: int = 8, landmarks: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_channels, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, heads, landmarks, dropout)
        self.position = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, landmarks, dropout)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_outputs)

    def encode(self, bag: torch.Tensor):
        """The class token after both layers (1, dim), and its last-layer attention over the
        cells (n,), averaged over heads, with each padding copy's share given back to its cell."""
        n = len(bag)
        side = math.isqrt(n - 1) + 1
        h = self.embed(bag)[None]
        h = torch.cat([self.cls_token, h, h[:, :side * side - n]], dim=1)
        h = self.position(self.layer1(h), side)
        h, attention = self.layer2(h, query=0)
        attention = attention[0, :, 1:].mean(0)
        cells = attention[:n].index_add(0, torch.arange(side * side - n, device=bag.device), attention[n:])
        return self.norm(h)[:, 0], cells

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(bag)[0])  # (1, n_out)

    def instance_scores(self, bag: torch.Tensor, output_index: int = 0) -> torch.Tensor:
        """The class token's last-layer attention to each cell (n,), times n (1 = uniform attention,
        whatever the bag's size). The same for every output: attention does not say which class."""
        return self.encode(bag)[1] * len(bag)


@register_slide_model(
    "transmil", input="bag",
    defaults=dict(epochs=200, batch_size=1, lr=2e-4, weight_decay=1e-5, dim=512, heads=8, landmarks=256,
                  dropout=0.1, max_cells=8192),
    scores="class token after two Nystrom self-attention layers and the PPEG position encoding",
    explanation="class-token attention (last layer) x n",
    description="TransMIL: Nystrom-attention transformer with PPEG position encoding (Shao et al. 2021)")
def build_transmil(in_channels: int, n_outputs: int, dim=512, heads=8, landmarks=256, dropout=0.1, **_) -> TransMIL:
    return TransMIL(in_channels, n_outputs, dim=dim, heads=heads, landmarks=landmarks, dropout=dropout)
