"""PatchCamelyon as a training task and as a held-out probe (label geometry, split filter, tiny runs)."""

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
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nic_pipeline.cli import main
from nic_pipeline.encoder import tiles as T
from nic_pipeline.encoder.config import dotted_overrides
from nic_pipeline.encoder.metrics import validation_score
from nic_pipeline.encoder.probe import holdout_probe
from nic_pipeline.encoder.train import train_encoder
from nic_pipeline.errors import NicError
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[2]
PCAM_MPP, PCAM_SIZE = 0.97, 96
CENTRE = (32, 64)  # PCam's label: tumour in the central 32 x 32 px


def _contains_centre(box) -> bool:
    x0, y0, side = box
    return all(a <= CENTRE[0] and a + side >= CENTRE[1] for a in (x0, y0))


def test_every_pcam_crop_keeps_the_labelled_centre():
    side = T.source_side(PCAM_MPP, 0.5, 128)  # 64 µm = 66 source px of the 96 px (93 µm) tile
    assert 65 < side < 67
    rng = np.random.default_rng(0)
    boxes = [T.random_box((PCAM_SIZE, PCAM_SIZE), side, rng) for _ in range(2000)]
    boxes += [b for n in (1, 2, 3) for b in T.grid_boxes((PCAM_SIZE, PCAM_SIZE), side, n)]
    assert all(_contains_centre(b) for b in boxes)
    assert min(b[0] for b in boxes) == 0.0 and max(b[0] for b in boxes) == pytest.approx(PCAM_SIZE - side)
    # the v2 config states exactly this geometry for its PCam source
    pcam = next(t for t in yaml.safe_load((REPO / "models/configs/nic-mtl-v2.yaml").read_text())["tasks"]
                if t["name"] == "pcam")
    source = pcam["sources"][0]
    assert source["mpp"] == PCAM_MPP and source["split"] == "train" and "CC0" in source["licence"]


def test_csv_source_keeps_one_split_and_groups_identical_files(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / f"p{i}.png")
        rows.append((f"p{i}.png", "a" if i % 2 else "b", "valid" if i >= 4 else "train"))
    (tmp_path / "twin.png").write_bytes((tmp_path / "p0.png").read_bytes())  # a byte-identical twin
    rows.append(("twin.png", "b", "train"))
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(tmp_path / "labels.csv", index=False)
    source = {"csv": "labels.csv", "mpp": 0.97, "split_column": "split", "split": "train",
              "group_by_content": True, "name": "pc"}
    table = T.read_source(source, tmp_path)
    assert sorted(Path(p).name for p in table["path"]) == ["p0.png", "p1.png", "p2.png", "p3.png", "twin.png"]
    groups = dict(zip(table["path"].map(lambda p: Path(p).name), table["group"]))
    assert groups["p0.png"] == groups["twin.png"] and len(set(groups.values())) == 4
    with pytest.raises(NicError, match="split_column 'fold'"):
        T.read_source({**source, "split_column": "fold"}, tmp_path)


def test_dotted_overrides_and_score_weight_cap():
    assert dotted_overrides(["augment.hed_sigma=0", "training.epochs=3", "name=x"]) == {
        "augment": {"hed_sigma": 0}, "training": {"epochs": 3}, "name": "x"}
    with pytest.raises(NicError, match="KEY=VALUE"):
        dotted_overrides(["augment.hed_sigma"])
    huge = SimpleNamespace(name="huge", head_kind="classification", groups=np.arange(2400).astype(str),
                           val_idx=np.arange(1200))
    lc = SimpleNamespace(name="lc", head_kind="classification", groups=np.arange(500).astype(str),
                         val_idx=np.arange(100))
    metrics = {"huge": {"balanced_accuracy": 1.0}, "lc": {"balanced_accuracy": 0.5}}
    assert validation_score([huge, lc], metrics, {}) == pytest.approx(0.75)  # both capped at 100 groups


def test_holdout_probe_matches_sklearn():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 12))
    y = np.where(X[:, 0] + rng.normal(0, 0.7, 300) > 0, "metastasis", "normal")
    test = np.arange(300) >= 200
    res = holdout_probe(X, y, test)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=0)).fit(X[~test], y[~test])
    expected = roc_auc_score(y[test] == "normal", model.predict_proba(X[test])[:, 1])
    assert res["auc"] == pytest.approx(expected) and res["n"] == 100 and res["n_train"] == 200
    assert res["auc"] > 0.8
    with pytest.raises(NicError, match="training and test rows"):
        holdout_probe(X, y, np.zeros(300, bool))


def _pcam_subset(tmp_path: Path, per_class_split: int) -> Path:
    """A labels.csv of a few real PCam patches per class and split (absolute paths)."""
    root = shared_path("pcam")
    table = pd.read_csv(root / "labels.csv")
    table = table.groupby(["split", "label"], group_keys=False).head(per_class_split).copy()
    table["path"] = [str(root / p) for p in table["path"]]
    out = tmp_path / "pcam.csv"
    table.to_csv(out, index=False)
    return out


def test_pcam_trains_as_a_task_on_its_train_split_only(tmp_path):
    csv = _pcam_subset(tmp_path, 4)  # 8 train + 8 valid patches
    cfg = {
        "name": "pcam-tiny", "seed": 0, "data_root": str(tmp_path), "device": "cpu",
        "training": {"epochs": 1, "steps_per_epoch": 2, "batch_per_task": 4, "val_fraction": 0.25, "val_grid": 1},
        "augment": {"hed_sigma": 0.0, "macenko_scale": 0.2, "macenko_shift": 0.2},
        "tasks": [{"name": "pcam", "type": "classification", "batch": 6,
                   "sources": [{"csv": csv.name, "root": "/", "mpp": PCAM_MPP, "split_column": "split",
                                "split": "train", "group_by_content": True, "licence": "PCam CC0 1.0"}]}],
    }
    path = tmp_path / "pcam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    card = train_encoder(path, tmp_path / "out", progress=False)
    task = card["tasks"][0]
    assert task["classes"] == ["metastasis", "normal"] and task["batch"] == 6
    assert task["n_tiles"] == 8 and task["n_train_tiles"] + task["n_val_tiles"] == 8  # no valid patch
    assert "auc" in card["validation"]["metrics"]["pcam"]
    assert card["config"]["augment"]["macenko_scale"] == 0.2
    assert json.loads((tmp_path / "out" / "pcam-tiny.json").read_text())["tasks"][0]["sources"][0]["licence"] \
        == "PCam CC0 1.0"


def test_pcam_probe_fits_on_train_and_scores_valid(tmp_path):
    csv = _pcam_subset(tmp_path, 6)
    npz = tmp_path / "pcam.npz"
    res = CliRunner().invoke(main, ["embed", str(csv), "--out", str(npz), "--encoder", "nic-mtl4-tellez2020",
                                    "--mpp", str(PCAM_MPP)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "probe.json"
    res = CliRunner().invoke(main, ["probe", str(npz), "--labels", str(csv), "--split-column", "split",
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    written = json.loads(out.read_text())
    assert written["n"] == 12 and written["n_train"] == 12 and written["test_split"] == "valid"
    assert 0.0 <= written["auc"] <= 1.0 and "auc" in res.output
    res = CliRunner().invoke(main, ["probe", str(npz), "--labels", str(csv), "--split-column", "split",
                                    "--test-split", "test"])
    assert res.exit_code != 0 and "'test'" in res.output
