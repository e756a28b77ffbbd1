"""Slide-level learning on compressed cohorts: source, folds, fit, the fold graph, prediction, explanation."""

from pipeline.classify.core import (
    MODELS,
    TASKS,
    SlideModel,
    SlideSource,
    assign_folds,
    check_store_matches,
    encode_targets,
    fit,
    list_store_slides,
    load_labels,
    metrics_summary,
    predict_cohort,
    resolve_params,
    target_spec,
    train_cohort,
)
