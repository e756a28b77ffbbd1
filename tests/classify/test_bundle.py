"""The saved model bundle: save/load round trip, parameters, and refusing a mismatched store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from nic_pipeline.classify import (
    SlideModel,
    SlideSource,
    check_store_matches,
    encode_targets,
    fit,
    resolve_params,
    target_spec,
)
from nic_pipeline.errors import NicError
from tests.classify.cohort import make_cohort


def test_a_saved_model_loads_and_scores_the_same(tmp_path):
    store, labels, _ = make_cohort(tmp_path / "a", n_slides=4, grid=12, channels=4, lesion_size=3)
    frame = pd.read_csv(labels)
    spec = target_spec(frame, "binary")
    source = SlideSource(store)
    for model, params in [("max", dict(epochs=5)), ("nic-cnn", dict(crop=8, steps=2, batch_size=2, width=8))]:
        bundle = fit(model, "binary", source, frame["slide_id"].tolist(), encode_targets(frame, spec), spec, params)
        bundle.save(tmp_path / model)
        loaded = SlideModel.load(tmp_path / model)
        assert loaded.entry.name == model and loaded.config["params"] == bundle.config["params"]
        for sid in frame["slide_id"]:
            np.testing.assert_allclose(loaded.raw_scores(source, sid), bundle.raw_scores(source, sid), rtol=1e-5)
            heat = loaded.explain(source, sid)
            assert np.isfinite(heat).sum() == source.valid_cells(sid).sum()

    other, _, _ = make_cohort(tmp_path / "b", n_slides=1, grid=12, channels=6, lesion_size=3)
    with pytest.raises(NicError, match="has 6 codes per cell, the model expects 4"):
        check_store_matches(loaded, SlideSource(other), "slide-000")
    with pytest.raises(NicError, match="no trained model"):
        SlideModel.load(tmp_path / "nothing")


def test_params_are_the_entry_defaults_with_overrides():
    params = resolve_params("abmil", {"epochs": 3})
    assert params["epochs"] == 3 and params["max_cells"] == 8192 and params["seed"] == 0
    with pytest.raises(NicError, match="unknown parameter.*stepz"):
        resolve_params("nic-cnn", {"stepz": 3})


def test_a_max_pooling_grid_head_scores_a_large_slide_by_its_best_crop(tmp_path):
    """local-max (window 1: the best cell) on a 32 x 32 grid read as 8 x 8 crops: the slide's
    score is the best cell of the whole grid, not the mean of the crops' best cells."""
    store, labels, _ = make_cohort(tmp_path, n_slides=4, grid=32, channels=4, lesion_size=3)
    frame = pd.read_csv(labels)
    spec = target_spec(frame, "binary")
    source = SlideSource(store)
    bundle = fit("local-max", "binary", source, frame["slide_id"].tolist(), encode_targets(frame, spec), spec,
                 dict(crop=8, steps=3, batch_size=2, window=1))
    bundle.module.eval()
    for sid in frame["slide_id"]:
        assert len(bundle.crop_origins(source, sid)) > 4
        whole = bundle.grid_input(*source.crop(sid, 0, 0, 32))[None]
        with torch.no_grad():
            best_cell = torch.sigmoid(bundle.module(whole))[0].numpy()
        np.testing.assert_allclose(bundle.raw_scores(source, sid), best_cell, rtol=1e-5)
