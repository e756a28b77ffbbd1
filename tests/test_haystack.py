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


def test_markdown_and_plot_from_results(haystack, tmp_path):
    results = {}
    for f, a in [(0.5, 1.0), (0.05, 0.93), (0.005, 0.6)]:
        c = haystack.Cohort("synthetic", f, 24, 4096)
        results[c.name] = _entry("synthetic", f, {"mean": a, "max": 1.0})
    text = haystack.markdown(results)
    assert "| synthetic | 24 × 4096² | 0.005 | 2.5 | 0.60 | 1.00 | – | – |" in text
    assert "| synthetic, 24 × 4096² | 0.05 | 0.005 | not run | not run |" in text
    out = tmp_path / "auc.png"
    haystack.plot(results, out)
    assert out.stat().st_size > 10_000
