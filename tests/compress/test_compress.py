"""The compression graph on real multi-process clusters: output, restarts, failures, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from nic_pipeline.compress.catalog import list_slides
from nic_pipeline.compress.codes import encode_patches
from nic_pipeline.compress.encode import EncoderSettings, NicWorker, read_cells
from nic_pipeline.compress.graph import compress
from nic_pipeline.compress.grid import Grid, iter_blocks
from nic_pipeline.compress.index import is_current, read_index
from nic_pipeline.compress.jobs import plan_jobs
from nic_pipeline.errors import NicError
from nic_pipeline.io import open_slide
from nic_pipeline.runtime.cluster import connect
from tests.conftest import shared_path

SETTINGS = EncoderSettings(precision="bf16")


def _store_bytes(store: Path, slide_id: str) -> dict[str, str]:
    """sha256 of every chunk and metadata file of one slide group (its attributes first, as
    themselves, so that a difference reads as one)."""
    attrs = json.loads((store / slide_id / "zarr.json").read_text())["attributes"]
    root = store / slide_id
    return {
        "attributes": attrs,
        **{str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(root.rglob("*")) if p.is_file()},
    }


def _grid_shape(store: Path) -> tuple[int, int]:
    return tuple(zarr.open_group(str(store), mode="r")["synth_kill"].attrs["grid_shape"])


def _done_blocks(store: Path, slide_id: str) -> int:
    """Blocks written so far: one shard file each."""
    return sum(1 for p in (store / slide_id / "features" / "c").rglob("*") if p.is_file())


@pytest.mark.slow
def test_real_svs_block_equals_direct_encoding(tmp_path, external_cluster):
    svs = shared_path("slides", "CMU-1-Small-Region.svs")
    store = tmp_path / "cmu.zarr"
    with connect(scheduler_file=external_cluster) as client:
        report = compress(plan_jobs([svs]), store, client, SETTINGS, block=8, progress=False)
    assert [s.status for s in report.slides] == ["complete"]
    ds = xr.open_zarr(store, group="CMU-1-Small-Region", consolidated=False)
    features, tissue = ds["features"].values.astype(np.float32), ds["tissue"].values
    encoded = np.abs(features).sum(axis=0) > 0
    np.testing.assert_array_equal(encoded, tissue >= 0.1)  # codes exactly where there is tissue
    assert report.patches == int(encoded.sum()) > 100

    # one block encoded directly, without Dask, gives the same codes within fp16 rounding
    encoder = NicWorker().encoder(SETTINGS)
    with open_slide(svs) as slide:
        grid = Grid(*slide.dimensions, slide.require_mpp(), 0.5, 128, 128)
        block = max(iter_blocks(grid.shape, 8), key=lambda b: (tissue[b.slices] >= 0.1).sum())
        rows, cols = np.nonzero(tissue[block.slices] >= 0.1)
        direct = encode_patches(encoder.module, read_cells(slide, grid, block, rows, cols), "bf16")
    stored = features[:, block.y0 + rows, block.x0 + cols].T
    np.testing.assert_allclose(stored, direct.astype(np.float32), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_a_killed_worker_changes_nothing_in_the_output(tmp_path, external_cluster, synthetic_slide):
    from distributed import Client

    jobs = plan_jobs([synthetic_slide])
    reference, interrupted = tmp_path / "reference.zarr", tmp_path / "interrupted.zarr"
    with Client(scheduler_file=external_cluster) as client:
        compress(jobs, reference, client, SETTINGS, block=4, progress=False)
        pids = list(client.run(os.getpid).values())
        killer = _kill_when_started(interrupted, "synth_kill", pids[0], 3)
        report = compress(jobs, interrupted, client, SETTINGS, block=4, progress=False)
        assert killer() is True, "the worker was not killed mid-run"
        client.wait_for_workers(2, timeout=120)
    assert report.slides[0].status == "complete"
    assert _store_bytes(interrupted, "synth_kill") == _store_bytes(reference, "synth_kill")


def _kill_when_started(store: Path, slide_id: str, pid: int, after_done: int):
    """Start a thread that SIGKILLs ``pid`` once ``after_done`` blocks of the slide are written."""
    import threading

    outcome = {}

    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if _done_blocks(store, slide_id) >= after_done:
                    os.kill(pid, signal.SIGKILL)
                    outcome["killed"] = True
                    return
            except Exception:  # the group does not exist yet
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return lambda: (thread.join(), outcome.get("killed"))[1]


@pytest.mark.slow
def test_a_killed_client_resumes_with_only_the_missing_blocks(tmp_path, external_cluster, synthetic_slide):
    from distributed import Client

    reference, resumed = tmp_path / "reference.zarr", tmp_path / "resumed.zarr"
    jobs = plan_jobs([synthetic_slide])
    with Client(scheduler_file=external_cluster) as client:
        total = compress(jobs, reference, client, SETTINGS, block=4, progress=False).blocks_encoded

    command = [sys.executable, "-m", "nic_pipeline", "compress", str(synthetic_slide), "--out", str(resumed),
               "--scheduler-file", external_cluster, "--block", "4", "--precision", "bf16"]
    client_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if _done_blocks(resumed, "synth_kill") >= 3:
                break
        except Exception:
            pass
        time.sleep(0.05)
    client_process.send_signal(signal.SIGKILL)
    client_process.wait()
    time.sleep(2)  # tasks already running on the workers may still land; the rerun must cope
    done_before = _done_blocks(resumed, "synth_kill")
    assert 0 < done_before < total, "the client was not killed mid-run"

    with Client(scheduler_file=external_cluster) as client:
        rerun = compress(jobs, resumed, client, SETTINGS, block=4, progress=False)
    assert rerun.slides[0].status == "complete"
    assert rerun.blocks_encoded == total - done_before
    assert is_current(resumed, read_index(resumed)["synth_kill"])  # the rerun indexed what the killed run had not
    assert _store_bytes(resumed, "synth_kill") == _store_bytes(reference, "synth_kill")

    with Client(scheduler_file=external_cluster) as client:  # a third run has nothing left to do
        again = compress(jobs, resumed, client, SETTINGS, block=4, progress=False)
    assert again.slides[0].status == "skipped" and again.blocks_encoded == 0


@pytest.mark.slow
def test_other_encoder_settings_are_refused_for_an_existing_store(tmp_path, external_cluster, synthetic_slide):
    from distributed import Client

    store = tmp_path / "s.zarr"
    with Client(scheduler_file=external_cluster) as client:
        compress(plan_jobs([synthetic_slide]), store, client, SETTINGS, block=16, progress=False)
        with pytest.raises(NicError, match="other compression settings"):
            compress(plan_jobs([synthetic_slide]), store, client, EncoderSettings(random_init=True, precision="bf16"),
                     block=16, progress=False)


@pytest.mark.slow
def test_cli_reports_bad_slides_and_finishes_the_rest(tmp_path, synthetic_slide):
    """The embedded default cluster, through the CLI: a missing-µm/px slide and a zero-byte file
    fail with their reasons, the good slide completes, exit code 1; then the override fixes it."""
    tcga = shared_path("slides", "TCGA-CR-7395-01A-01-TS1.svs")
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    store = tmp_path / "cohort.zarr"
    base = [sys.executable, "-m", "nic_pipeline", "compress", "--out", str(store), "--workers", "2"]
    first = subprocess.run(base + [str(synthetic_slide), str(tcga), str(empty)], capture_output=True, text=True)
    assert first.returncode == 1, first.stderr
    assert f"FAILED {tcga.resolve()}" in first.stderr and "--mpp" in first.stderr
    assert f"FAILED {empty.resolve()}" in first.stderr and "empty" in first.stderr.lower()
    assert "dashboard: http" in first.stdout
    assert list_slides(store) == ["synth_kill"]

    second = subprocess.run(base + [str(synthetic_slide), str(tcga), "--mpp", "0.25"], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert list_slides(store) == ["TCGA-CR-7395-01A-01-TS1", "synth_kill"]
    ds = xr.open_zarr(store, group="TCGA-CR-7395-01A-01-TS1", consolidated=False)
    assert ds.attrs["slide_mpp"] == 0.25 and ds["features"].shape[1:] == (1783 // 128, 2221 // 128)

    listing = subprocess.run([sys.executable, "-m", "nic_pipeline", "inspect", str(store)], capture_output=True,
                             text=True)
    assert "TCGA-CR-7395-01A-01-TS1" in listing.stdout and "complete" in listing.stdout


@pytest.mark.slow
def test_the_compress_client_never_imports_torch(tmp_path, synthetic_slide):
    """`nic compress` with the embedded cluster: the client decides GPU or CPU workers without
    torch (seconds of every start); only the workers load it."""
    store = tmp_path / "light.zarr"
    code = ("import sys; from nic_pipeline.cli import main; "
            f"main(['compress', {str(synthetic_slide)!r}, '--out', {str(store)!r}, '--workers', '1'], standalone_mode=False); "
            "print('client imported torch:', 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "client imported torch: False" in done.stdout
    assert list_slides(store) == ["synth_kill"]


@pytest.mark.gpu
def test_gpu_worker_matches_cpu_within_half_precision(tmp_path, synthetic_slide):
    """The same functions on a GPU worker (cuCIM device='cuda', CuPy, fp16 autocast) give the
    codes the CPU path gives, within half-precision rounding."""
    from nic_pipeline.runtime.device import resolve_device

    assert resolve_device() == "cuda"
    jobs = plan_jobs([synthetic_slide])
    stores = {}
    for name, settings in (("gpu", EncoderSettings(precision="fp16")),
                           ("cpu", EncoderSettings(precision="fp32", device="cpu"))):
        stores[name] = tmp_path / f"{name}.zarr"
        with connect(workers=1, dashboard=False) as client:
            report = compress(jobs, stores[name], client, settings, progress=False)
        assert report.slides[0].status == "complete"
    gpu, cpu = (xr.open_zarr(stores[n], group="synth_kill", consolidated=False)["features"].values.astype(np.float32)
                for n in ("gpu", "cpu"))
    np.testing.assert_allclose(gpu, cpu, rtol=2e-2, atol=2e-2)
