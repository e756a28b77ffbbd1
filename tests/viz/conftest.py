"""A small trained run for the heatmap tests: a generated cohort (tests/classify/cohort.py), the
`mean` model fitted in this process (no cluster), saved as a run with two 'folds' whose
out-of-fold table names its slides, and two slide files the store records as its sources."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from nic_pipeline.classify.fit import fit
from nic_pipeline.classify.labels import encode_targets, load_labels, target_spec
from nic_pipeline.classify.source import SlideSource
from nic_pipeline.synth import write_synthetic_slide
from tests.classify.cohort import CELL_PX, SLIDE_MPP, make_cohort

GRID = 16


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz-run")
    store, labels_csv, masks = make_cohort(root, n_slides=6, grid=GRID, channels=8, lesion_size=4, shift=4.0)
    labels = load_labels(labels_csv, "binary")
    spec = target_spec(labels, "binary")
    ids = labels["slide_id"].tolist()
    bundle = fit("mean", "binary", SlideSource(store), ids, encode_targets(labels, spec), spec, {"epochs": 150})
    run_dir = root / "run"
    for where in (run_dir, run_dir / "folds" / "fold-0", run_dir / "folds" / "fold-1"):
        bundle.save(where)
    pd.DataFrame({"slide_id": ids, "fold": [0, 1] * 3, "label": labels["label"], "score": 0.5}).to_csv(
        run_dir / "oof_predictions.csv", index=False)
    slides = root / "slides"
    for sid in ids[:2]:  # slide files for two slides, where the store says they are
        path = write_synthetic_slide(slides / f"{sid}.tif", GRID * CELL_PX, GRID * CELL_PX, mpp=SLIDE_MPP, seed=3).path
        zarr.open_group(str(store), path=sid, mode="r+").attrs["source_path"] = str(path)
    return dict(store=store, labels=labels_csv, masks=masks, run=run_dir, ids=ids, slides=slides, root=root)


def dense_copy(store, out, ids):
    """The store's slides as if compressed at stride 64: 2n-1 cells per side, each code that of the
    stride-128 cell its patch mostly covers (enough for the geometry and the lesion)."""
    for sid in ids:
        ds = xr.open_zarr(store, group=sid, consolidated=False).load()
        n = ds.sizes["y"]
        pick = np.arange(2 * n - 1) // 2
        features = ds["features"].values[:, pick][:, :, pick]
        tissue = ds["tissue"].values[pick][:, pick]
        centres = np.arange(2 * n - 1) * 32.0 + 32.0
        dense = xr.Dataset({"features": (("feature", "y", "x"), features), "tissue": (("y", "x"), tissue)},
                           coords={"y": centres, "x": centres, "feature": ds["feature"].values},
                           attrs={**ds.attrs, "stride": 64})
        dense.to_zarr(out, group=sid, mode="w", zarr_format=3, consolidated=False)
    return out
