"""Helpers of benchmarks/haystack.py (the study itself is a long run, not a test)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def haystack():
    spec = importlib.util.spec_from_file_location("haystack", ROOT / "benchmarks" / "haystack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["haystack"] = module          # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("haystack", None)


def _entry(texture, fraction, aucs, slides=24, size=4096):
    return {"cohort": dict(texture=texture, fraction=fraction, slides=slides, size=size, seed=0),
            "sizes": dict(tissue_cells_mean=500.0, tissue_cells_min=400.0, tissue_cells_max=600.0, positives=12,
                          lesion_cells_mean=fraction * 500, lesion_um2_mean=1.0, realized_fraction_mean=fraction),
            "models": {m: {"auc": a} for m, a in aucs.items()}}


def test_limit_is_the_smallest_fraction_of_an_unbroken_run_above_threshold(haystack):
    series = [(0.5, 1.0), (0.05, 0.95), (0.01, 0.85), (0.002, 0.92)]   # the 0.002 rebound does not count
    assert haystack.limit(series) == 0.05
    assert haystack.limit([(0.5, 0.8), (0.05, 0.95)]) is None
    assert haystack.limit([(0.5, 1.0), (0.002, 0.9)]) == 0.002


def test_cohort_names_are_unique_per_setting(haystack):
    names = [c.name for plan in haystack.PLANS.values() for c in plan]
    cohorts = {c for plan in haystack.PLANS.values() for c in plan}
    assert len(set(names)) == len(cohorts)
    dense = haystack.Cohort("pcam", 0.002, 40, 8192, stride=64)
    assert dense.name == "pcam-f0.002-n40-s8192-st64"
    assert dense.slides_name == haystack.Cohort("pcam", 0.002, 40, 8192).name   # the same slides


def test_every_registered_head_is_in_the_study(haystack):
    from nic_models.slide_models import list_slide_models

    assert set(haystack.MODELS) == set(list_slide_models())
    assert haystack.MODELS[:4] == ("mean", "max", "abmil", "nic-cnn")


@pytest.mark.slow
def test_markdown_and_plot_from_results(haystack, tmp_path):
    results = {}
    for f, a in [(0.5, 1.0), (0.05, 0.93), (0.005, 0.6)]:
        c = haystack.Cohort("synthetic", f, 24, 4096)
        results[c.name] = _entry("synthetic", f, {"mean": a, "max": 1.0})
    dense = haystack.Cohort("pcam", 0.002, 40, 8192, stride=64)
    results[dense.name] = {**_entry("pcam", 0.002, {"abmil": 0.7}, 40, 8192), "cohort": {
        **_entry("pcam", 0.002, {}, 40, 8192)["cohort"], "stride": 64}}
    text = haystack.markdown(results)
    others = len(haystack.MODELS) - 2        # every other registered head: not run here
    assert "| synthetic | 24 × 4096² | 0.005 | 2.5 | 0.60 | 1.00 |" + " – |" * others in text
    assert "| synthetic, 24 × 4096² | 0.05 | 0.005" + " | not run" * others + " |" in text
    assert "| pcam | 40 × 8192², stride 64 | 0.002 | 1.0 | – | – | 0.70 |" in text
    out = tmp_path / "auc.png"
    haystack.plot(results, out)
    assert out.stat().st_size > 10_000
    # a slide-count series (PCam, 1 %) adds its panel; the probe's lines join the heads
    for n, a in [(40, 0.5), (160, 0.6)]:
        c = haystack.Cohort("pcam", 0.01, n, 4096)
        results[c.name] = _entry("pcam", 0.01, {"mean": a, "local-max": a + 0.1}, n, 4096)
    probes = {name: {"slide_auc_max_cell": 0.6, "slide_auc_window5": 0.8} for name in results}
    haystack.plot(results, out, probes=probes)
    assert out.stat().st_size > 10_000


def test_best_window_mean_lifts_a_faint_patch_of_adjacent_cells(haystack):
    """The probe's spatial read-out: a 3 x 3 patch of cells at +1 beats one noise cell at +2.5 once
    scores are averaged over 3 x 3 windows, though the single best cell says otherwise."""
    import numpy as np

    cells = np.array([(r, c) for r in range(10) for c in range(10)])
    scores = np.zeros(len(cells))
    scores[[r * 10 + c for r in range(5, 8) for c in range(5, 8)]] = 1.0  # the patch
    scores[1 * 10 + 1] = 2.5  # one bright cell alone
    assert haystack.best_window_mean(scores, cells, (10, 10), 1) == 2.5
    assert haystack.best_window_mean(scores, cells, (10, 10), 3) == pytest.approx(1.0)
    edge = haystack.best_window_mean(scores[:10], cells[:10], (10, 10), 3)  # one row of tissue: windows 1/3 covered
    assert edge == pytest.approx(0.0)
