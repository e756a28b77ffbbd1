"""`nic demo` run twice: the rerun skips every finished step, says so, and starts no cluster."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from nic_pipeline.cli import main


@pytest.mark.slow  # about a minute on a loaded 2-core machine
def test_a_demo_rerun_skips_what_is_done_and_says_so(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", str(out), "--slides", "4", "--size", "1024", "--lesion-fraction", "0.3", "--model", "mean",
            "--folds", "2", "--workers", "1"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "1/5 synthesizing 4 slides" in first.output and "skipped" not in first.output
    model = out / "run" / "model.safetensors"
    trained = model.stat().st_mtime_ns

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "synthesizing 4 slides" not in again.output and "dashboard:" not in again.output  # no cluster
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"{step} " in again.output and again.output.count("already done by an earlier run, skipped") == 5
    assert model.stat().st_mtime_ns == trained  # not retrained
    assert '"out_of_fold_metrics"' in again.output

