"""What every slide-level head shares: output sizes, scores and losses per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nic_models.dihedral import dihedral

TASKS = ("binary", "multiclass", "regression", "survival")


def n_outputs_for(task: str, n_classes: int = 2) -> int:
    """Number of output units: one logit/value/risk, or one logit per class for multiclass."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return n_classes if task == "multiclass" else 1


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


def bag_loss(module: nn.Module, task: str, bags, target: torch.Tensor, **loss_targets) -> torch.Tensor:
    """Training loss of a mini-batch of bags (each (n_i, C)) for a bag module.

    The task loss of the outputs; a module that also provides an auxiliary loss (``forward_extras(bag)``
    -> (outputs, extras) and ``auxiliary_loss(extras, target, task)`` -> scalar or None) trains on
    ``(1 - w) * task loss + w * mean auxiliary loss`` with ``w = module.auxiliary_weight``."""
    if not hasattr(module, "auxiliary_loss"):
        return task_loss(task, torch.cat([module(bag) for bag in bags]), target, **loss_targets)
    outputs, extra_losses = [], []
    for bag, bag_target in zip(bags, target):
        out, extras = module.forward_extras(bag)
        outputs.append(out)
        term = module.auxiliary_loss(extras, bag_target, task)
        if term is not None:
            extra_losses.append(term)
    loss = task_loss(task, torch.cat(outputs), target, **loss_targets)
    if not extra_losses:
        return loss
    weight = module.auxiliary_weight
    return (1 - weight) * loss + weight * torch.stack(extra_losses).mean()


def predict_dihedral(model: nn.Module, crops: torch.Tensor, task: str) -> torch.Tensor:
    """Scores of crops (n, C, H, W) averaged over the 8 rotations/flips -> (n, n_out).

    The 8 transforms go through the model as one batch (the model must be in eval mode, so
    BatchNorm treats samples independently)."""
    n = crops.shape[0]
    if crops.shape[-1] != crops.shape[-2]:  # rotations of a non-square crop change its shape
        return torch.stack([scores_from_outputs(task, model(dihedral(crops, k))) for k in range(8)]).mean(0)
    batch = torch.cat([dihedral(crops, k) for k in range(8)])
    return scores_from_outputs(task, model(batch)).reshape(8, n, -1).mean(0)
