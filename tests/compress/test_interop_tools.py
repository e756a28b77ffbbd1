"""Our export read by CLAM's own loading code, and TRIDENT's layout read and written back.

CLAM is not a dependency and none of its code is in this repository: the test that runs it needs
a checkout named by ``NIC_CLAM_DIR`` (github.com/mahmoodlab/CLAM, checked at 53e2409) and skips
without one. What CLAM reads is in its ``dataset_modules/dataset_generic.py``:
``Generic_MIL_Dataset.__getitem__`` loads ``<data_dir>/pt_files/<slide_id>.pt`` with
``torch.load`` by default, and ``<data_dir>/h5_files/<slide_id>.h5``'s ``features`` and
``coords`` after ``load_from_h5(True)``. TRIDENT (github.com/mahmoodlab/TRIDENT) writes
``<job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5`` beside
``patches/<slide>_patches.h5``, with the attributes of its ``IO.coords_to_h5`` on ``coords``
and ``encoder`` on ``features``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from nic_pipeline.classify.source import SlideSource
from nic_pipeline.compress.grid import iter_blocks
from nic_pipeline.compress.interop import export_h5, import_h5
from nic_pipeline.compress.store import create_slide, mark_complete, open_store, write_block
from tests.compress.test_interop import CONFIG, GRID, SOURCE, write_bag

CLAM_DIR = os.environ.get("NIC_CLAM_DIR")

CLAM_LOAD = """
import json, sys
from dataset_modules.dataset_generic import Generic_MIL_Dataset
from models.model_clam import CLAM_SB
dataset = Generic_MIL_Dataset(csv_path=sys.argv[1], data_dir=sys.argv[2], shuffle=False, print_info=False,
                              label_dict={"normal": 0, "tumor": 1}, patient_strat=False, ignore=[])
features, label = dataset[0]
dataset.load_from_h5(True)
from_h5, _, coords = dataset[0]
logits, prob, y_hat, attention, _ = CLAM_SB(n_classes=2, embed_dim=features.shape[1]).eval()(features)
print(json.dumps({"shape": list(features.shape), "dtype": str(features.dtype), "label": int(label),
                  "same": bool((features == from_h5).all()), "coords": list(coords.shape),
                  "attention": list(attention.shape), "prob": float(prob.sum())}))
"""


@pytest.fixture
def cohort(tmp_path):
    """A store with two complete slides of 8-d codes on a 0.25 µm/px scan read at 0.5 µm/px."""
    path = tmp_path / "s.zarr"
    root = open_store(path, CONFIG)
    rng = np.random.default_rng(1)
    for slide_id in ("normal_1", "tumor_1"):
        tissue = (rng.random(GRID.shape) > 0.4).astype(np.float32)
        group = create_slide(root, slide_id, GRID, CONFIG, tissue, {**SOURCE, "source_fingerprint": slide_id})
        codes = rng.normal(size=(8, *GRID.shape)).astype(np.float16) * (tissue > 0)
        for block in iter_blocks(GRID.shape, 4):
            write_block(group, block, codes[(slice(None), *block.slices)])
        mark_complete(group)
    return path


@pytest.mark.skipif(not CLAM_DIR, reason="set NIC_CLAM_DIR to a CLAM checkout to load our export with CLAM's code")
def test_clams_own_dataset_and_model_read_our_export(cohort, tmp_path):
    export_h5(cohort, tmp_path / "feats")
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,slide_id,label\nc1,tumor_1,tumor\nc2,normal_1,normal\n")
    done = subprocess.run([sys.executable, "-c", CLAM_LOAD, str(labels), str(tmp_path / "feats")], cwd=CLAM_DIR,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    with h5py.File(tmp_path / "feats/h5_files/tumor_1.h5") as handle:
        n = len(handle["features"])
    assert seen["shape"] == [n, 8] and seen["dtype"] == "torch.float32" and seen["label"] == 1 and seen["same"]
    assert seen["coords"] == [n, 2] and seen["attention"] == [1, n] and seen["prob"] == pytest.approx(1.0)


def trident_job(root: Path, slide: str, coords, features, width: int, height: int, overlap: int = 0) -> Path:
    """A TRIDENT job folder for one slide at 20x from 40x, 256 px patches: its patches file and its
    feature file with the attributes TRIDENT writes. Returns the features folder."""
    run = root / f"20x_256px_{overlap}px_overlap"
    attrs = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20,
             "overlap": overlap, "name": slide, "savetodir": str(run / "patches"), "level0_width": width,
             "level0_height": height}
    write_bag(run / "patches" / f"{slide}_patches.h5", coords, features=np.zeros((len(coords), 1)), coords_attrs=attrs)
    write_bag(run / "features_uni_v1" / f"{slide}.h5", coords, features=features, coords_attrs=attrs,
              feature_attrs={"name": slide, "savetodir": str(run / "features_uni_v1"), "encoder": "uni_v1"})
    return run / "features_uni_v1"


def test_a_trident_folder_imports_and_exports_back_with_what_trident_reads(tmp_path):
    coords = np.array([[0, 0], [512, 0], [1024, 512], [2048, 1536]])
    features = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
    folder = trident_job(tmp_path / "job", "t1", coords, features, width=3000, height=2500)
    report = import_h5([folder], tmp_path / "t.zarr")  # no --encoder, no --mpp: both are in the file
    assert report.imported == ["t1"], report.refused
    source = SlideSource(tmp_path / "t.zarr")
    attrs = source.meta("t1")["attrs"]
    assert attrs["encoder"] == "uni_v1" and attrs["slide_mpp"] == 0.25 and attrs["mpp"] == 0.5
    assert attrs["grid_shape"] == [2500 // 512, 3000 // 512] and attrs["mpp_source"] == "h5-magnification"
    np.testing.assert_array_equal(source.features("t1")[:, coords[:, 1] // 512, coords[:, 0] // 512].T,
                                  features.astype(np.float16))
    [back] = export_h5(tmp_path / "t.zarr", tmp_path / "out")
    with h5py.File(back) as ours, h5py.File(folder / "t1.h5") as theirs:
        np.testing.assert_array_equal(ours["coords"][:], theirs["coords"][:])
        np.testing.assert_allclose(ours["features"][:], theirs["features"][:], rtol=1e-3)
        assert ours["features"].attrs["encoder"] == "uni_v1"
        for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                    "level0_width", "level0_height"):
            assert ours["coords"].attrs[key] == theirs["coords"].attrs[key], key


def test_a_trident_bag_with_overlap_lands_on_its_grid(tmp_path):
    coords = np.array([[0, 0], [512, 0], [256, 768]])
    features = np.arange(12, dtype=np.float32).reshape(1, 3, 4)  # with a batch axis, as older TRIDENT kept
    folder = trident_job(tmp_path / "job", "t", coords, features, width=1024, height=1280, overlap=128)
    assert import_h5([folder / "t.h5"], tmp_path / "t.zarr").imported == ["t"]
    source = SlideSource(tmp_path / "t.zarr")
    grid = source.features("t")
    assert source.meta("t")["attrs"]["stride"] == 128 and grid.shape == (4, 4, 3)  # 256 level-0 px steps over 1024 x 1280 px
    np.testing.assert_array_equal(grid[:, 0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(grid[:, 0, 2], [4, 5, 6, 7])  # 512 px at a 256 px step
    np.testing.assert_array_equal(grid[:, 3, 1], [8, 9, 10, 11])
