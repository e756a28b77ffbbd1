"""topk: top-k instance pooling, a MIL baseline for low signal-to-noise slides.

Each tissue cell gets a linear score; the slide output is the mean of the k highest scores.
With k=1 this is max-pooling MIL (Campanella et al., Nat. Med. 2019, who train on each slide's
top-1 tile); the default k=10 follows the same paper's slide-level aggregator, which reads the
S=10 top-ranked tiles of a slide. A lesion of fewer than k cells still raises the output, while
one noisy cell alone moves it by only 1/k.
"""

from __future__ import annotations

import torch
from torch import nn

from nic_models.slide_models.registry import register_slide_model


class TopKMIL(nn.Module):
    """A linear instance scorer s_i = w^T h_i + b; output = mean of the k largest s_i (per output)."""

    def __init__(self, in_channels: int, n_outputs: int, k: int = 10):
        super().__init__()
        self.k = int(k)
        self.score = nn.Linear(in_channels, n_outputs)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        return self.score(bag).topk(min(self.k, len(bag)), dim=0).values.mean(0)[None]  # (1, n_out)

    def instance_scores(self, bag: torch.Tensor, output_index: int = 0) -> torch.Tensor:
        """Each cell's score for output ``output_index`` (n,); the output is the mean of the k largest."""
        return self.score(bag)[:, output_index]


@register_slide_model(
    "topk", input="bag",
    defaults=dict(epochs=100, batch_size=8, lr=1e-3, weight_decay=1e-4, k=10, max_cells=8192),
    scores="mean of the k highest linear cell scores",
    explanation="cell score",
    description="top-k instance pooling with a linear cell scorer (k=10 after Campanella et al. 2019)")
def build_topk(in_channels: int, n_outputs: int, k=10, **_) -> TopKMIL:
    return TopKMIL(in_channels, n_outputs, k=k)
