"""Training loops by input kind, and the promise of the registry: a new MIL head is one module
and one registration, and the whole pipeline (folds on a process cluster, prediction, heatmaps)
runs it without knowing its name."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from nic_models.slide_models import get_slide_model_spec, list_slide_models, register_slide_model
from nic_pipeline.classify import SlideSource, encode_targets, fit, predict_cohort, target_spec, train_cohort
from nic_pipeline.classify.explain import explain_cohort
from nic_pipeline.classify.metrics import auc
from nic_pipeline.cli import main

torch.set_num_threads(1)  # as a fold task trains; two threads on a busy two-core machine run several times slower


class TopKMean(nn.Module):
    """Scores each cell with one linear layer; the slide output is the mean of its k best cells."""

    def __init__(self, in_channels: int, n_outputs: int, k: int = 8):
        super().__init__()
        self.k = k
        self.score = nn.Linear(in_channels, n_outputs)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        return self.score(bag).topk(min(self.k, len(bag)), dim=0).values.mean(0)[None]

    def instance_scores(self, bag: torch.Tensor, output_index: int = 0) -> torch.Tensor:
        return self.score(bag)[:, output_index]


@register_slide_model("topk-mean", input="bag", defaults=dict(epochs=60, lr=1e-2, weight_decay=0.0, k=8),
                      scores="mean of the k highest cell scores", explanation="cell score")
def build_topk_mean(in_channels, n_outputs, k=8, **_):
    return TopKMean(in_channels, n_outputs, k)


@pytest.mark.slow
def test_a_head_registered_here_trains_predicts_and_explains(cohort, client, tmp_path):
    store, labels, masks = cohort
    assert "topk-mean" in list_slide_models() and get_slide_model_spec("topk-mean").input == "bag"
    run = tmp_path / "run"
    metrics = train_cohort(store, labels, run, model="topk-mean", folds=3, client=client, params={"k": 4})
    assert metrics["model"] == "topk-mean" and metrics["params"]["k"] == 4
    assert metrics["pooled"]["auc"] >= 0.9, metrics["pooled"]
    assert json.loads((run / "config.json").read_text())["model"] == "topk-mean"

    preds = predict_cohort(store, run)
    assert auc(preds["slide_id"].str[-3:].astype(int) % 2 == 1, preds["score"]) >= 0.9
    heat = explain_cohort(store, run, tmp_path / "heat", masks_dir=masks, slide_ids=["slide-001", "slide-003"])
    assert json.loads((tmp_path / "heat" / "heatmaps.json").read_text())["method"] == "cell score"
    assert heat["lesion_auc"].min() >= 0.9, heat


def test_bag_loop_pools_once_for_parameter_free_pooling(cohort):
    """mean/max heads expose pool + classify: the loop trains on pooled codes, full batch."""
    store, labels, _ = cohort
    frame = pd.read_csv(labels).head(8)
    spec = target_spec(frame, "binary")
    source = SlideSource(store)
    bundle = fit("mean", "binary", source, frame["slide_id"].tolist(), encode_targets(frame, spec), spec,
                 {"epochs": 200})
    scores = np.array([bundle.predict_row(source, s)["score"] for s in frame["slide_id"]])
    assert auc(frame["label"], scores) == 1.0  # the training slides are fit


@pytest.mark.slow
def test_dsmil_trains_predicts_and_explains_through_the_pipeline(cohort, client, tmp_path):
    """A built-in low-SNR head (issue 12) runs the whole bag path with its registry defaults
    except a short schedule: out-of-fold AUC, prediction, and heatmaps that find the lesion."""
    store, labels, masks = cohort
    run = tmp_path / "run"
    metrics = train_cohort(store, labels, run, model="dsmil", folds=3, client=client, params={"epochs": 10})
    assert metrics["model"] == "dsmil" and metrics["params"]["lr"] == 2e-4
    assert metrics["pooled"]["auc"] >= 0.9, metrics["pooled"]
    heat = explain_cohort(store, run, tmp_path / "heat", masks_dir=masks, slide_ids=["slide-001", "slide-003"])
    assert heat["lesion_auc"].min() >= 0.9, heat


def test_clam_instance_loss_trains_through_the_bag_loop(cohort):
    """The bag loop's auxiliary-loss hook trains CLAM-SB's instance classifier, which no bag loss
    reaches: on the training cohort it tells the lesion cells of positive slides from the rest."""
    store, labels, masks = cohort
    frame = pd.read_csv(labels)
    spec = target_spec(frame, "binary")
    source = SlideSource(store)
    bundle = fit("clam-sb", "binary", source, frame["slide_id"].tolist(), encode_targets(frame, spec), spec,
                 {"epochs": 2})
    for sid in frame["slide_id"][frame["label"] == 1]:
        codes, cells = source.bag(sid)
        with torch.no_grad():
            probability = bundle.module.instance_probabilities(bundle.bag_input(codes)).numpy()
        lesion = np.asarray(Image.open(masks / f"{sid}_lesion.png"))[::4, ::4] > 0  # 4 mask px per cell
        assert auc(lesion[cells[:, 0], cells[:, 1]], probability) >= 0.9, sid


@pytest.mark.slow
def test_transmil_trains_predicts_and_explains_through_the_pipeline(cohort, client, tmp_path):
    """TransMIL runs the whole bag path: out-of-fold AUC, prediction and class-token attention
    heatmaps that find the lesion. Smaller than the paper (dim 64, 32 landmarks; the paper's 512
    and 256 take ~1 s a bag on one CPU thread), a short schedule, bags sub-sampled to 256 cells."""
    store, labels, masks = cohort
    run = tmp_path / "run"
    params = dict(epochs=3, lr=1e-3, dim=64, landmarks=32, max_cells=256)
    metrics = train_cohort(store, labels, run, model="transmil", folds=3, client=client, params=params)
    assert metrics["model"] == "transmil" and metrics["params"]["heads"] == 8
    assert metrics["pooled"]["auc"] >= 0.9, metrics["pooled"]
    heat = explain_cohort(store, run, tmp_path / "heat", masks_dir=masks, slide_ids=["slide-001", "slide-003"])
    assert json.loads((tmp_path / "heat" / "heatmaps.json").read_text())["method"].startswith("class-token attention")
    assert heat["lesion_auc"].min() >= 0.9, heat


def test_nic_train_help_names_every_built_in_head():
    """`nic train --help` lists the heads of models/slide_models (the CLI does not import torch to
    build its help, so the list is written out there)."""
    builds = {name: get_slide_model_spec(name).build for name in list_slide_models()}
    built_in = [name for name, build in builds.items()  # mean/max register a functools.partial
                if getattr(build, "func", build).__module__.startswith("nic_models.slide_models.")]
    assert {"transmil", "clam-sb", "dsmil", "topk"} <= set(built_in)
    option = next(p for p in main.commands["train"].params if p.name == "model")
    listed = option.help.split(":", 1)[1].split("(")[0]
    assert sorted(name.strip() for name in listed.split(",")) == sorted(built_in)


def test_a_training_crop_holds_a_slide_whole_along_every_axis_that_fits():
    """Grid 20 x 50, crop 32: rows always whole (a lesion is never cropped out along them),
    columns a tissue-centred window; the grid's place in the crop still varies."""
    from nic_pipeline.classify.fit import random_crop_origin

    tissue = np.zeros((20, 50))
    tissue[5:15, 10:40] = 1
    flat = np.flatnonzero(tissue)
    centres = (flat, np.linspace(1 / len(flat), 1, len(flat)), tissue.shape)
    rng = np.random.default_rng(0)
    origins = np.array([random_crop_origin(centres, 32, rng) for _ in range(500)])
    assert ((origins[:, 0] <= 0) & (origins[:, 0] + 32 >= 20)).all()
    assert len(np.unique(origins[:, 0])) == 13                   # every placement of 20 rows in 32
    assert (origins[:, 1] + 32 < 50).any() and (origins[:, 1] > 0).any()   # columns: windows
    centre_col = origins[:, 1] + 16
    assert ((centre_col >= 10 - 8) & (centre_col < 40 + 8)).all()   # around tissue, jitter ≤ a quarter crop
