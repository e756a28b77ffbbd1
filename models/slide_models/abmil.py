"""abmil: gated attention MIL pooling over the tissue cells of a slide (Ilse et al., ICML 2018).

Reads a bag of cell codes; one forward pass gives the slide's output; explains itself by each
cell's attention-weighted contribution to the output (:meth:`GatedAttentionMIL.instance_scores`).
"""

from __future__ import annotations

import torch
from torch import nn

from nic_models.slide_models.registry import register_slide_model


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

    def instance_scores(self, bag: torch.Tensor, output_index: int = 0) -> torch.Tensor:
        """Each cell's contribution to output ``output_index`` (n,): n * a_i * (w . h_i). The
        output is their mean plus the bias (the head is linear), so the values compare across
        slides: a cell that draws attention on a negative slide but does not push the output up
        stays quiet. ``attention`` alone is relative to its own slide."""
        h, attention = self.attention(bag)
        return attention * bag.shape[0] * (h @ self.head.weight[output_index])


@register_slide_model(
    "abmil", input="bag",
    defaults=dict(epochs=200, batch_size=8, lr=5e-4, weight_decay=5e-4, dropout=0.25, embed=128, attention=64,
                  max_cells=8192),
    scores="one forward pass over all tissue cells",
    explanation="attention x cell logit",
    description="gated attention MIL pooling over tissue cells (Ilse et al. 2018)")
def build_abmil(in_channels: int, n_outputs: int, embed=128, attention=64, dropout=0.25, **_) -> GatedAttentionMIL:
    return GatedAttentionMIL(in_channels, n_outputs, embed=embed, attention=attention, dropout=dropout)
