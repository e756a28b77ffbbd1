"""SlideSource: crops and bags read from the store, cached or streamed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from nic_pipeline.classify import SlideSource, encode_targets, fit, target_spec
from nic_pipeline.cli import main
from nic_pipeline.errors import NicError
from tests.classify.cohort import make_cohort


def test_crops_stream_from_zarr_with_zero_padding(tmp_path):
    store, _, _ = make_cohort(tmp_path, n_slides=2, grid=12, channels=4, lesion_size=3)
    cached, streaming = SlideSource(store, cache_mb=64), SlideSource(store, cache_mb=0)
    full = cached.features("slide-000")
    for y0, x0 in [(-3, -2), (4, 5), (8, 9)]:
        a, ta = cached.crop("slide-000", y0, x0, 6)
        b, tb = streaming.crop("slide-000", y0, x0, 6)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)
        ys, xs = slice(max(y0, 0), y0 + 6), slice(max(x0, 0), x0 + 6)
        np.testing.assert_array_equal(a[:, ys.start - y0:ys.start - y0 + full[:, ys, xs].shape[1],
                                         xs.start - x0:xs.start - x0 + full[:, ys, xs].shape[2]], full[:, ys, xs])
    assert streaming._cached_bytes == 0  # nothing held beyond the crop
    codes, cells = cached.bag("slide-000")
    assert codes.shape == (len(cells), 4)
    assert np.all(np.any(codes != 0, axis=1))

    # training with no cache at all: every crop / bag is read from Zarr when needed
    labels = pd.DataFrame({"slide_id": ["slide-000", "slide-001"], "label": [0, 1]})
    spec = target_spec(labels, "binary")
    for model, params in [("nic-cnn", dict(crop=8, steps=2, batch_size=2, width=8)), ("abmil", dict(epochs=1))]:
        bundle = fit(model, "binary", streaming, ["slide-000", "slide-001"], encode_targets(labels, spec), spec, params)
        assert 0 <= bundle.predict_row(streaming, "slide-001")["score"] <= 1
    assert streaming._cached_bytes == 0


def _truncate_first_chunk(store, slide_id: str, array: str = "features") -> None:
    chunk = next(p for p in sorted((store / slide_id / array).rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])


def test_a_truncated_chunk_is_one_error_naming_store_and_slide(tmp_path, client):
    store, labels, _ = make_cohort(tmp_path, n_slides=6, grid=12, channels=4, lesion_size=3)
    _truncate_first_chunk(store, "slide-002")
    with pytest.raises(NicError, match=r"cohort.zarr: cannot read 'features' of slide 'slide-002'.*recompress"):
        SlideSource(store).features("slide-002")
    _truncate_first_chunk(store, "slide-004", "tissue")
    with pytest.raises(NicError, match="slide 'slide-004'"):
        SlideSource(store, cache_mb=0).crop("slide-004", 0, 0, 4)

    result = CliRunner().invoke(main, ["train", str(store), "--labels", str(labels), "--out", str(tmp_path / "run"),
                                       "--model", "mean", "--folds", "2", "--scheduler", client.scheduler.address])
    assert result.exit_code == 2, result.output
    assert "slide 'slide-00" in result.output and "Traceback" not in result.output
