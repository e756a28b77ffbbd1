"""Slide-level heads that read compressed slide tensors (the second NIC stage), by registry.

One file per head registers it (see :mod:`nic_models.slide_models.registry`); importing this
package registers the built-in heads: nic-cnn, abmil, mean, max, topk, dsmil, clam-sb, transmil,
local-max.
"""

from nic_models.slide_models import abmil, clam_sb, dsmil, local_max, nic_cnn, pooling, topk, transmil  # noqa: F401  (registers heads)
from nic_models.slide_models.registry import (
    INPUTS,
    SlideModelSpec,
    UnknownSlideModel,
    create_slide_model,
    get_slide_model_spec,
    list_slide_models,
    register_slide_model,
)
from nic_models.slide_models.tasks import (
    TASKS,
    bag_loss,
    cox_loss,
    n_outputs_for,
    predict_dihedral,
    scores_from_outputs,
    task_loss,
)

__all__ = ["INPUTS", "TASKS", "SlideModelSpec", "UnknownSlideModel", "bag_loss", "cox_loss", "create_slide_model",
           "get_slide_model_spec", "list_slide_models", "n_outputs_for", "predict_dihedral", "register_slide_model",
           "scores_from_outputs", "task_loss"]
