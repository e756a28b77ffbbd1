"""Slide-level learning on compressed cohorts: source, labels and folds, the model bundle, fit,
the fold graph, prediction and explanation."""

from nic_pipeline.classify.bundle import SlideModel, check_store_matches, resolve_params
from nic_pipeline.classify.fit import fit
from nic_pipeline.classify.graph import metrics_summary, predict_cohort, train_cohort
from nic_pipeline.classify.labels import TASKS, assign_folds, encode_targets, load_labels, target_spec
from nic_pipeline.classify.source import SlideSource, list_store_slides

__all__ = ["TASKS", "SlideModel", "SlideSource", "assign_folds", "check_store_matches", "encode_targets", "fit",
           "list_store_slides", "load_labels", "metrics_summary", "predict_cohort", "resolve_params",
           "target_spec", "train_cohort"]
