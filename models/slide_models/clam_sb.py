"""clam-sb: CLAM single-branch (Lu et al., Nat. Biomed. Eng. 2021), bag path only.

CLAM-SB's bag path is gated attention pooling (the same form as abmil) with the authors'
"small" sizes: a 512-wide embedding (Linear, ReLU, dropout 0.25) and a 256-wide gated
attention. MISSING: CLAM's instance-level clustering loss (pseudo-labels for the k=8 top- and
bottom-attended cells, weighted 0.3 against 0.7 for the bag loss) needs a second loss term,
and the bag training loop (pipeline/classify/fit.py) trains on ``task_loss(outputs)`` alone.
Defaults: Adam lr 2e-4 and weight decay 1e-5 (the paper), dropout 0.25, 200 epochs, one bag a step.
"""

from __future__ import annotations

from models.slide_models.abmil import build_abmil
from models.slide_models.registry import register_slide_model

# abmil's module with CLAM's sizes and training defaults (create() passes the defaults to build).
register_slide_model(
    "clam-sb", input="bag", build=build_abmil,
    defaults=dict(epochs=200, batch_size=1, lr=2e-4, weight_decay=1e-5, dropout=0.25, embed=512, attention=256,
                  max_cells=8192),
    scores="one forward pass over all tissue cells (gated attention)",
    explanation="attention x cell logit",
    description="CLAM single-branch gated attention, bag loss only (Lu et al. 2021)")
