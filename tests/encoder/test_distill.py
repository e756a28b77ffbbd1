"""Distilling a teacher encoder into the NIC CNN, on small generated tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.numpy import load_file

from nic_models.encoders import NicCNN
from nic_models.registry import create_encoder, save_encoder
from nic_pipeline.encoder.distill import code_agreement, distill_encoder, fold_standardisation
from tests.encoder.test_train_encoder import _tile


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Generated tiles of two kinds, a training config over them, and a small random teacher
    with its own geometry (96 px, 3 blocks): the student must see the teacher's field of view."""
    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    rows = []
    (root / "tiles").mkdir()
    for i in range(16):
        kind = "dense" if i % 2 else "sparse"
        img, _ = _tile(rng, kind, 160)
        Image.fromarray(img).save(root / "tiles" / f"t{i}.png")
        rows.append(f"t{i}.png,{kind},g{i}")
    (root / "tiles" / "labels.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    cfg = {"name": "tiny", "seed": 0, "data_root": str(root), "threads": 1, "device": "cpu",
           "training": {"val_fraction": 0.25, "val_grid": 1},
           "distill": {"student": "nic-mtl4-tellez2020", "epochs": 3, "batch": 16, "grid": 2, "lr": 1e-3},
           "tasks": [{"name": "kinds", "type": "classification",
                      "sources": [{"csv": "tiles/labels.csv", "mpp": 0.5, "licence": "generated"}]}]}
    config = root / "distill.yaml"
    config.write_text(yaml.safe_dump(cfg))
    torch.manual_seed(3)
    teacher = NicCNN(patch_size=96, input_pool=1, n_blocks=3)
    card = save_encoder(teacher, root / "teacher", "random-teacher", patch_size=96, register=False,
                        architecture_kwargs={"patch_size": 96, "input_pool": 1, "channels": 128,
                                             "n_blocks": 3, "code_dim": 128})
    return root, config, str(card)


def test_the_student_learns_the_teachers_codes(setup):
    root, config, teacher = setup
    card = distill_encoder(config, teacher, root / "out", name="tiny-fast", progress=False)
    assert card["source"]["distilled_from"] == "random-teacher"
    assert card["architecture"] == "nic-cnn" and card["code_dim"] == 128
    history = card["distillation"]["history"]
    assert len(history) == 3 and history[-1]["train_mse"] < history[0]["train_mse"]

    student = create_encoder(str(root / "out" / "tiny-fast.json"))
    start = create_encoder("nic-mtl4-tellez2020")
    teach = create_encoder(teacher)
    rng = np.random.default_rng(5)
    images = [_tile(rng, "dense" if i % 2 else "sparse", 96)[0] for i in range(24)]
    small = np.stack([np.asarray(Image.fromarray(im).resize((128, 128), Image.BILINEAR)) for im in images])
    with torch.no_grad():
        want = teach(np.stack(images)).numpy()
        got, before = student(small).numpy(), start(small).numpy()
    # the student writes codes in the teacher's own space, closer than where it started
    assert np.mean((got - want) ** 2) < 0.5 * np.mean((before - want) ** 2)


def test_distillation_is_deterministic(setup, tmp_path):
    root, config, teacher = setup
    overrides = {"distill": {"epochs": 1}}
    distill_encoder(config, teacher, tmp_path / "a", overrides=overrides, progress=False)
    distill_encoder(config, teacher, tmp_path / "b", overrides=overrides, progress=False)
    a = load_file(str(tmp_path / "a" / "random-teacher-fast.safetensors"))
    b = load_file(str(tmp_path / "b" / "random-teacher-fast.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "random-teacher-fast.json").read_text())["distillation"]["patches"]["train"] > 0


def test_folding_the_standardisation_writes_the_teachers_space():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    mean, std = np.array([1.0, -2.0, 0.5], np.float32), np.array([2.0, 0.5, 3.0], np.float32)
    with torch.no_grad():
        standardised = layer(x)
        fold_standardisation(layer, mean, std)
        assert torch.allclose(layer(x), standardised * torch.from_numpy(std) + torch.from_numpy(mean), atol=1e-5)


def test_code_agreement_is_one_for_identical_codes():
    codes = np.random.default_rng(0).normal(size=(20, 8))
    assert code_agreement(codes, codes)["r2"] == pytest.approx(1.0)
    assert code_agreement(np.zeros_like(codes), codes)["r2"] < 0.1


def test_a_students_licence_joins_its_teachers_and_its_start_points(setup):
    root, config, teacher = setup
    card = json.loads((root / "out" / "tiny-fast.json").read_text())
    assert card["licence"]["spdx"].split(" AND ")[0] == "NOASSERTION"  # the random teacher declares none
    assert "MIT" in card["licence"]["spdx"]  # nic-mtl4-tellez2020, the start point
    assert card["licence"]["data"] == "generated"
