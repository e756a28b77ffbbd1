"""dsmil: dual-stream MIL (Li, Li & Eliceiri, CVPR 2021) over the tissue cells of a slide.

Stream 1 scores every cell with a linear instance classifier and takes the max (the critical
cell). Stream 2 attends every cell to the critical one by query similarity and classifies the
attention-pooled bag embedding. The output is the mean of the two, as in the paper.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nic_models.slide_models.registry import register_slide_model


class DSMIL(nn.Module):
    """Dual-stream MIL over a bag (n, C), after the authors' ``dsmil.py``.

    c_i = W_0 h_i; m = argmax_i c_i (per output); q_i = q(h_i), v_i = v(h_i);
    A_i = softmax_i(<q_i, q_m> / sqrt(d)); b = sum_i A_i v_i; bag score = W_b b;
    output = (max_i c_i + bag score) / 2.
    """

    def __init__(self, in_channels: int, n_outputs: int, query: int = 128, dropout: float = 0.0):
        super().__init__()
        self.instance = nn.Linear(in_channels, n_outputs)
        self.query = nn.Sequential(nn.Linear(in_channels, query), nn.ReLU(), nn.Linear(query, query), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_channels, in_channels), nn.ReLU())
        # the paper's Conv1d(n_out, n_out, kernel=C) over the per-output embeddings, as one weight
        self.bag_weight = nn.Parameter(torch.empty(n_outputs, n_outputs, in_channels))
        self.bag_bias = nn.Parameter(torch.zeros(n_outputs))
        nn.init.uniform_(self.bag_weight, -1 / math.sqrt(n_outputs * in_channels), 1 / math.sqrt(n_outputs * in_channels))

    def streams(self, bag: torch.Tensor):
        """Instance scores c (n, n_out), attention A (n, n_out) summing to 1 per output, values V (n, C)."""
        c = self.instance(bag)
        q = self.query(bag)
        critical = q[c.argmax(0)]  # (n_out, d): the query of each output's highest-scoring cell
        attention = torch.softmax(q @ critical.T / math.sqrt(q.shape[1]), dim=0)
        return c, attention, self.value(bag)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        c, attention, v = self.streams(bag)
        bag_score = torch.einsum("kjc,jc->k", self.bag_weight, attention.T @ v) + self.bag_bias
        return ((c.max(0).values + bag_score) / 2)[None]  # (1, n_out)

    def instance_scores(self, bag: torch.Tensor, output_index: int = 0) -> torch.Tensor:
        """Each cell's evidence for output ``output_index`` (n,): the mean of its instance score
        c_i and its share of the bag score, n * sum_j A_ij (W_b[k, j] . v_i) (whose mean plus the
        bias is the bag score). Both halves compare across slides, unlike the attention alone."""
        c, attention, v = self.streams(bag)
        share = bag.shape[0] * (attention * (v @ self.bag_weight[output_index].T)).sum(1)
        return (c[:, output_index] + share) / 2


@register_slide_model(
    "dsmil", input="bag",
    defaults=dict(epochs=200, batch_size=1, lr=2e-4, weight_decay=5e-3, dropout=0.0, query=128, max_cells=8192),
    scores="mean of the max-instance score and the critical-instance attention bag score",
    explanation="(cell score + cell share of the bag score) / 2",
    description="dual-stream MIL with max-instance critical attention (Li, Li & Eliceiri 2021)")
def build_dsmil(in_channels: int, n_outputs: int, query=128, dropout=0.0, **_) -> DSMIL:
    return DSMIL(in_channels, n_outputs, query=query, dropout=dropout)
