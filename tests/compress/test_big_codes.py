"""The grid with big codes (issue 23): 2,560 channels per cell, as Virchow2 writes (class token +
patch-token mean), end to end. A real encoder of that code size (a NIC-CNN card with code_dim
2560, random weights, saved and registered as a user's card is) compresses a small synthetic
cohort on an in-process Dask cluster; then the store's chunking and size, every slide head of the
registry for a step or two, heatmaps, and the CLAM/TRIDENT export with ``pt_files/``.

The slow test runs a foundation preset (Kaiko ViT-S/16 with random weights in its vendor's timm
layout) through ``nic compress`` -> ``nic train`` -> ``nic heatmap`` as commands.
"""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from distributed import Client, LocalCluster
from safetensors.torch import save_file

from nic_models.cards import save_encoder
from nic_models.encoders import build_nic_cnn
from nic_models.slide_models import get_slide_model_spec, list_slide_models
from nic_pipeline.classify.explain import explain_cohort
from nic_pipeline.classify.fit import fit
from nic_pipeline.classify.labels import encode_targets
from nic_pipeline.classify.source import SlideSource
from nic_pipeline.compress.api import compress
from nic_pipeline.compress.interop import export_h5
from nic_pipeline.compress.catalog import list_slides
from nic_pipeline.compress.store import CHUNK
from nic_pipeline.synth import CohortSpec, write_cohort

CODE_DIM = 2560
SIDE = 1024  # px per slide side at 0.5 µm/px: 8 x 8 cells of 128 px
# Each head for one or two units on 4 slides of 8 x 8 cells: small crops and bags, one thread.
QUICK = {"grid": dict(steps=2, batch_size=2, crop=16), "bag": dict(epochs=1, batch_size=2)}


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """Four synthetic slides compressed with a 2,560-channel NIC-CNN card: (store, labels, slides)."""
    root = tmp_path_factory.mktemp("big-codes")
    slides = root / "slides"
    write_cohort(slides, CohortSpec(n_slides=4, width=SIDE, height=SIDE, mpp=0.5, lesion_fraction=0.3,
                                    positive_fraction=0.5, seed=1))
    torch.manual_seed(0)
    kwargs = dict(code_dim=CODE_DIM)
    card = save_encoder(build_nic_cnn(**kwargs), root / "cards", "nic-2560-random", architecture_kwargs=kwargs,
                        code_dim=CODE_DIM, register=False)
    store = root / "cohort.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        report = compress(str(slides), store, client, encoder=str(card), precision="fp32", progress=False)
    assert not report.failed, report.failed
    return store, slides / "labels.csv", slides


def test_store_holds_2560_channel_codes_in_few_bounded_chunks(big_store):
    store, labels, _ = big_store
    ids = list_slides(store)
    assert sorted(ids) == sorted(pd.read_csv(labels)["slide_id"])
    group = zarr.open_group(str(store), path=ids[0], mode="r")
    features = group["features"]
    assert features.shape == (CODE_DIM, 8, 8) and features.dtype == np.float16
    # an inner chunk is every channel of at most 32 x 32 cells: 5 MiB at 2,560 channels, never more
    c, cy, cx = features.chunks
    assert c == CODE_DIM and cy <= CHUNK and cx <= CHUNK
    assert CODE_DIM * CHUNK * CHUNK * 2 == 5 * 2**20
    # one shard file per block with tissue, not one file per chunk or per channel
    files = [p for p in (store / ids[0]).rglob("*") if p.is_file()]
    shards = [p for p in files if "/features/c/" in p.as_posix()]
    assert 1 <= len(shards) <= 4 and len(files) <= 8 + len(shards), [p.name for p in files]
    # the codes are real: finite, non-zero on tissue cells, zero elsewhere
    codes, tissue = features[...].astype(np.float32), group["tissue"][...]
    on = tissue >= group.attrs["min_tissue"]
    assert on.any() and np.isfinite(codes).all()
    assert (np.abs(codes[:, on]).sum(0) > 0).all() and not codes[:, ~on].any()
    # zstd never makes a shard larger than its block's float16 (docs/compress.md, "Big codes")
    stored = sum(p.stat().st_size for p in shards)
    assert stored < features.size * 2


def built_in_heads() -> list[str]:
    """The heads of models/slide_models (other test modules register heads of their own)."""
    def module(name):
        build = get_slide_model_spec(name).build
        return getattr(build, "func", build).__module__
    return [name for name in list_slide_models() if module(name).startswith("nic_models.slide_models")]


@pytest.mark.parametrize("name", built_in_heads())
def test_every_slide_head_trains_scores_and_explains_2560_channel_codes(big_store, name):
    store, labels_csv, _ = big_store
    entry = get_slide_model_spec(name)
    labels = pd.read_csv(labels_csv)
    spec = {"task": "binary", "classes": sorted(labels["label"].astype(str).unique())}
    targets = encode_targets(labels, spec)
    source = SlideSource(store)
    torch.set_num_threads(1)
    before = entry.create(CODE_DIM + (entry.input == "grid"), 1, **QUICK[entry.input])
    bundle = fit(name, "binary", source, list(labels["slide_id"]), targets, spec,
                 {**QUICK[entry.input], "seed": 0})
    assert bundle.config["code_dim"] == CODE_DIM
    if name == "nic-cnn":  # the codes are mapped to 128 channels before the paper's network
        assert bundle.module.reduce[0].in_channels == CODE_DIM and bundle.module.blocks[0].depthwise.in_channels == 129
    trained = dict(bundle.module.named_parameters())
    assert any(not torch.equal(p, trained[k]) for k, p in before.named_parameters()), "no parameter moved"
    for sid in labels["slide_id"]:
        scores = bundle.raw_scores(source, sid)
        assert scores.shape == (1,) and np.isfinite(scores).all()
        heat = bundle.explain(source, sid)
        valid = source.valid_cells(sid)
        assert heat.shape == (8, 8) and np.isfinite(heat[valid]).all() and np.isnan(heat[~valid]).all()


@pytest.mark.slow
def test_heatmaps_of_a_2560_channel_store(big_store, tmp_path):
    store, labels_csv, slides = big_store
    labels = pd.read_csv(labels_csv)
    spec = {"task": "binary", "classes": sorted(labels["label"].astype(str).unique())}
    bundle = fit("abmil", "binary", SlideSource(store), list(labels["slide_id"]), encode_targets(labels, spec), spec,
                 {"epochs": 2, "seed": 0})
    bundle.save(tmp_path / "run")
    table = explain_cohort(store, tmp_path / "run", tmp_path / "heat", slides_dir=slides)
    assert sorted(table["slide_id"]) == sorted(labels["slide_id"])
    for sid in labels["slide_id"]:
        assert (tmp_path / "heat" / f"{sid}.png").stat().st_size > 0
        relevance = np.load(tmp_path / "heat" / "relevance" / f"{sid}.npy")
        assert relevance.shape == (8, 8) and np.isfinite(relevance).any()


def test_pca_rgb_of_wide_codes_finds_the_same_directions_as_a_full_decomposition(big_store):
    from nic_pipeline.viz.pca import EXACT_CHANNELS, PcaRgb

    store, _, _ = big_store
    source = SlideSource(store)
    codes = np.concatenate([source.bag(sid)[0] for sid in list_slides(store)]).astype(np.float64)
    rng = np.random.default_rng(0)
    wide = rng.normal(size=(1000, EXACT_CHANNELS + 44)) * np.linspace(3, 0.1, EXACT_CHANNELS + 44)
    for sample in (codes, wide):  # fewer cells than channels (Gram matrix), then more (Lanczos)
        centred = sample - sample.mean(0)
        full = np.linalg.svd(centred, full_matrices=False)[2][:3].T
        fitted = PcaRgb.fit(sample).components
        np.testing.assert_allclose(np.abs((fitted * full).sum(0)), 1.0, atol=1e-6)


def test_clam_export_writes_2560_d_features_to_h5_and_pt_files(big_store, tmp_path):
    store, labels_csv, _ = big_store
    written = export_h5(store, tmp_path / "clam")
    source = SlideSource(store)
    assert len(written) == len(pd.read_csv(labels_csv))
    for h5 in written:
        sid = h5.stem
        with h5py.File(h5, "r") as handle:
            features, coords = handle["features"][...], handle["coords"][...]
        assert features.dtype == np.float32 and features.shape[1] == CODE_DIM and len(coords) == len(features)
        pt = torch.load(tmp_path / "clam" / "pt_files" / f"{sid}.pt", weights_only=True)
        assert pt.shape == features.shape and np.array_equal(pt.numpy(), features)
        bag, _ = source.bag(sid)  # the same codes the slide heads read (cells with tissue, raster order)
        np.testing.assert_array_equal(features, bag)


# --------------------------------------------------------------------------- a foundation preset, as commands


def _nic(*args, timeout=600):
    done = subprocess.run([sys.executable, "-m", "nic_pipeline", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_kaiko_vits16_preset_runs_compress_train_heatmap(tmp_path):
    """Kaiko ViT-S/16 (384-d class token) with random weights saved as the vendor's timm
    ``model.safetensors``, loaded through the preset by ``nic compress --weights``."""
    import timm

    from nic_models.presets import PRESETS

    preset = next(p for p in PRESETS if p.name == "kaiko-vits16")
    torch.manual_seed(0)
    net = timm.create_model(preset.architecture, pretrained=False, num_classes=0, **preset.kwargs)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    _nic("synth", tmp_path / "slides", "--slides", 4, "--width", SIDE, "--height", SIDE, "--lesion-fraction", 0.3,
         "--seed", 2)
    store = tmp_path / "cohort.zarr"
    _nic("compress", tmp_path / "slides", "--out", store, "--encoder", "kaiko-vits16", "--weights", weights,
         "--workers", 1, "--precision", "fp32")
    group = zarr.open_group(str(store), mode="r")
    ids = list_slides(store)
    assert len(ids) == 4 and group[ids[0]]["features"].shape[0] == preset.code_dim
    assert group.attrs["compression"]["encoder"] == "kaiko-vits16"
    _nic("train", store, "--labels", tmp_path / "slides" / "labels.csv", "--out", tmp_path / "run", "--model",
         "abmil", "--folds", 1, "--workers", 1, "--param", "epochs=5")
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["code_dim"] == preset.code_dim
    _nic("heatmap", store, "--model", tmp_path / "run", "--out", tmp_path / "heat", "--slides", tmp_path / "slides")
    assert sorted(p.stem for p in (tmp_path / "heat").glob("*.png") if p.stem in ids) == sorted(ids)
