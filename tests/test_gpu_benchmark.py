"""benchmarks/gpu.py, the GPU benchmark of issue 14: its dry run (every step on the CPU with tiny
slides) and the docs section it writes. The GPU figures themselves come from a lent GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
ROWS = {"tests", "tissue-cpu", "tissue-gpu", "decode-cpu", "decode-gpu-cuslide", "decode-gpu-nvimgcodec",
        "decode-gpu-nvimgcodec-nocheck", "encode-nic-fp16", "encode-nic-fp32", "encode-resnet50-trunc-fp16",
        "encode-resnet50-trunc-fp32", "codes-cpu", "cluster-start", "codes-gpu-fp16", "codes-gpu-fp32", "warm-resnet",
        "api-nic-slide", "api-resnet50-trunc-slide", "synth-big", "api-nic-big", "api-resnet50-trunc-big",
        "command-nic-slide", "command-resnet50-trunc-slide"}


def load(name: str):
    """A module of benchmarks/ (which puts benchmarks/ on sys.path: taken off again here)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


def test_pytest_counts_read_the_closing_line():
    gpu = load("gpu")
    assert gpu.pytest_counts("..F\n= 3 passed, 1 failed, 2 skipped, 280 deselected, 1 error in 12.30s =\n") == {
        "passed": 3, "failed": 1, "skipped": 2, "error": 1, "deselected": 280}
    assert gpu.pytest_counts("SKIPPED [1] x.py:3: 2 passed before\n13 skipped, 282 deselected in 7.29s\n")["skipped"] == 13
    assert gpu.pytest_counts("ImportError while loading conftest\n") == dict.fromkeys(
        ("passed", "failed", "skipped", "error", "deselected"), 0)


def test_docs_hold_the_scripts_method_and_recipe():
    report = load("gpu_report")
    text = DOCS.read_text()
    section = text[text.index("\n## GPU\n") + 1:]
    assert section.split("### Results")[0] == report.render(None).split("### Results")[0]
    for name, version in load("gpu_wheels").WHEELS.items():
        assert f"- {name}=={version}\n" in section


def test_report_before_any_run_and_section_replacement():
    report = load("gpu_report")
    lines = report.render(None).split("### Results")[1].splitlines()
    assert "Card: not yet measured." in lines
    data = [line for line, below in zip(lines, lines[1:] + [""])
            if line.startswith("| ") and not below.startswith("|---")]  # table rows, not headers
    assert len(data) == 22 and all("not yet measured" in line for line in data)
    text = "# Benchmarks\n\n## A\na\n\n## GPU\nold\n\n## C\nc\n"
    replaced = report.replace_section(text, "## GPU\n\nnew\n")
    assert replaced == "# Benchmarks\n\n## A\na\n\n## GPU\n\nnew\n\n## C\nc\n"
    assert report.replace_section("# Benchmarks\n", "## GPU\nnew") == "# Benchmarks\n\n## GPU\nnew\n"


@pytest.mark.slow
def test_dry_run_runs_every_step_on_the_cpu_and_leaves_docs_alone(tmp_path):
    before = DOCS.read_text()
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry-run", "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OUT": str(out)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "gpu-benchmark.json").read_text())
    assert results["dry_run"] and not results["skipped"], results["skipped"]
    assert set(results["rows"]) == ROWS
    rows = results["rows"]
    assert rows["tests"]["exit_code"] == 0 and rows["tests"]["skipped"] >= 10 and rows["tests"]["passed"] == 0
    assert all(row["rate"] > 0 for row in rows.values() if "rate" in row)
    assert rows["tissue-gpu"]["agreement"] == 1.0  # the same NumPy code twice
    # the cluster's worker and the CPU-only command decode and encode alike at fp32
    assert rows["codes-gpu-fp32"]["cells"] > 0 and rows["codes-gpu-fp32"]["cells_in_one_only"] == 0
    assert rows["codes-gpu-fp32"]["max_abs"] < 1e-3
    assert rows["codes-gpu-fp32"]["within_tolerance"]
    assert rows["api-nic-big"]["patches"] > rows["api-nic-slide"]["patches"] > 0
    assert rows["command-nic-slide"]["patches"] == rows["api-nic-slide"]["patches"]
    assert rows["command-nic-slide"]["wall_s"] > rows["command-nic-slide"]["seconds"]
    written = (out / "benchmarks.md").read_text()
    assert "dry run on the CPU" in written and "not yet measured" not in written.split("### Results")[1]
    assert (out / "pytest-gpu.txt").exists() and (tmp_path / "work" / "gpu-benchmark.json").exists()
    assert DOCS.read_text() == before
