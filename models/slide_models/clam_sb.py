"""clam-sb: CLAM single-branch (Lu et al., Nat. Biomed. Eng. 2021), after the authors' ``model_clam.py``.

The bag path is gated attention pooling (the same form as abmil) with the authors' "small"
sizes: a 512-wide embedding (Linear, ReLU, dropout 0.25) and a 256-wide gated attention. The
instance-level clustering loss: the ``k_sample`` (8) most- and least-attended cells of a bag get
pseudo-labels 1 and 0 for the instance classifier of the bag's class (a linear layer on the
embedding, one per class), trained with the smooth top-1 SVM loss (Berrada et al., ICLR 2018;
alpha 1, tau 1); for multiclass (CLAM's subtyping setting) the other classes' classifiers also
learn to call the most-attended cells negative. The bag loop trains on 0.7 x bag loss + 0.3 x
instance loss (:func:`nic_models.slide_models.tasks.bag_loss`; regression and survival have no
class to pseudo-label and train on the bag loss alone).
Defaults: Adam lr 2e-4 and weight decay 1e-5 (the paper), dropout 0.25, 200 epochs, one bag a step.
"""

from __future__ import annotations

import torch
from torch import nn

from nic_models.slide_models.abmil import GatedAttentionMIL
from nic_models.slide_models.registry import register_slide_model


def smooth_top1_svm(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """Smooth top-1 multiclass SVM loss (Berrada, Zisserman & Kumar 2018), the loss CLAM uses for
    its instance classifiers: tau * log sum_j exp((s_j + alpha [j != y]) / tau) - s_y, averaged."""
    margin = alpha * (1 - nn.functional.one_hot(target, logits.shape[1]).to(logits.dtype))
    return (tau * torch.logsumexp((logits + margin) / tau, dim=1) - logits.gather(1, target[:, None])[:, 0]).mean()


class ClamSB(GatedAttentionMIL):
    """Gated attention MIL with CLAM's instance classifiers and clustering loss (see the module docstring)."""

    def __init__(self, in_channels: int, n_outputs: int, embed: int = 512, attention: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, bag_weight: float = 0.7):
        super().__init__(in_channels, n_outputs, embed=embed, attention=attention, dropout=dropout)
        self.n_classes = max(n_outputs, 2)  # one logit for binary tasks, yet two classes to cluster
        self.instance_classifiers = nn.ModuleList(nn.Linear(embed, 2) for _ in range(self.n_classes))
        self.k_sample = int(k_sample)
        self.auxiliary_weight = 1.0 - float(bag_weight)

    def forward_extras(self, bag: torch.Tensor):
        """Outputs (1, n_out) and what the instance loss needs: embeddings and attention."""
        h, a = self.attention(bag)
        return self.head(a @ h)[None], (h, a)

    def auxiliary_loss(self, extras, target: torch.Tensor, task: str):
        """CLAM's instance loss for one bag of class ``target`` (None for regression/survival)."""
        if task not in ("binary", "multiclass"):
            return None
        h, a = extras
        k = min(self.k_sample, max(len(a) // 2, 1))
        top, bottom = a.topk(k).indices, (-a).topk(k).indices
        zeros = torch.zeros(k, dtype=torch.long, device=h.device)
        label = int(target)
        pseudo = torch.cat([zeros + 1, zeros])  # top-attended cells are the class, bottom-attended not
        losses = [smooth_top1_svm(self.instance_classifiers[label](h[torch.cat([top, bottom])]), pseudo)]
        if task == "multiclass":  # subtyping: the other classes call the most-attended cells negative
            losses += [smooth_top1_svm(self.instance_classifiers[c](h[top]), zeros)
                       for c in range(self.n_classes) if c != label]
        return torch.stack(losses).mean()

    def instance_probabilities(self, bag: torch.Tensor, class_index: int = 1) -> torch.Tensor:
        """P(cell belongs to class ``class_index``) (n,) from that class's instance classifier."""
        h, _ = self.attention(bag)
        return torch.softmax(self.instance_classifiers[class_index](h), dim=1)[:, 1]


@register_slide_model(
    "clam-sb", input="bag",
    defaults=dict(epochs=200, batch_size=1, lr=2e-4, weight_decay=1e-5, dropout=0.25, embed=512, attention=256,
                  k_sample=8, bag_weight=0.7, max_cells=8192),
    scores="one forward pass over all tissue cells (gated attention)",
    explanation="attention x cell logit",
    description="CLAM single-branch: gated attention with the instance clustering loss (Lu et al. 2021)")
def build_clam_sb(in_channels: int, n_outputs: int, embed=512, attention=256, dropout=0.25, k_sample=8,
                  bag_weight=0.7, **_) -> ClamSB:
    return ClamSB(in_channels, n_outputs, embed=embed, attention=attention, dropout=dropout, k_sample=k_sample,
                  bag_weight=bag_weight)
