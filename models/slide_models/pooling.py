"""mean, max: pool the codes over tissue cells, then one linear (logistic) layer (baselines).

Reads a bag of cell codes; the pooling has no parameters, so training pools each slide once
(:meth:`PoolingLinear.pool`, :meth:`PoolingLinear.classify`); explains itself by each cell's
share of the linear output (:meth:`PoolingLinear.instance_scores`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from nic_models.slide_models.registry import register_slide_model


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

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Outputs (..., n_out) of pooled codes (..., C)."""
        return self.linear(pooled)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(bag))[None]  # (1, n_out)

    def contributions(self, bag: torch.Tensor, output_index: int = 0) -> torch.Tensor:
        """Per-cell share of the output (n,): w.x_i for mean pooling (the output is their mean
        plus the bias); for max pooling each channel's term w_c max_c goes to its argmax cell."""
        w = self.linear.weight[output_index]
        if self.pooling == "mean":
            return bag @ w
        idx = bag.argmax(0)
        values = bag.gather(0, idx[None])[0] * w
        return torch.zeros(bag.shape[0], dtype=bag.dtype, device=bag.device).index_add_(0, idx, values)

    def instance_scores(self, bag: torch.Tensor, output_index: int = 0) -> torch.Tensor:
        """Per-cell share of the output (n,), see :meth:`contributions`."""
        return self.contributions(bag, output_index)


POOLING_DEFAULTS = dict(epochs=300, lr=1e-2, weight_decay=1e-3, batch_size=None)


def build_pooling(in_channels: int, n_outputs: int, pooling: str = "mean", **_) -> PoolingLinear:
    return PoolingLinear(in_channels, n_outputs, pooling=pooling)


for _pooling in ("mean", "max"):
    register_slide_model(
        _pooling, input="bag", defaults=POOLING_DEFAULTS,
        scores=f"linear layer on the {_pooling} of the codes over all tissue cells",
        explanation="linear contribution per cell",
        description=f"{_pooling} pooling of the codes over tissue cells, then one linear (logistic) layer",
        build=functools.partial(build_pooling, pooling=_pooling))
