"""Compression on a shared cluster as users meet it: real slide names on the dashboard, relative
paths, checks before submitting, late workers of another kind, finished slides checked again on
rerun, the µm/px rule, a full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import Client

from nic_pipeline.compress.encode import EncoderSettings
from nic_pipeline.compress.graph import RunOptions, compress
from nic_pipeline.compress.jobs import plan_jobs
from nic_pipeline.compress.catalog import describe_store
from nic_pipeline.errors import NicError
from nic_pipeline.runtime.preflight import check_versions, check_visible
from nic_pipeline.synth import write_synthetic_slide
from tests.compress.conftest import start_cluster, start_workers, stop
from tests.conftest import shared_path

SETTINGS = EncoderSettings(precision="fp32")
SLIDE_ID = "synth_kill"


def _features(store, slide_id=SLIDE_ID) -> np.ndarray:
    return xr.open_zarr(store, group=slide_id, consolidated=False)["features"].values


def _nic(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nic_pipeline", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.slow
def test_dashboard_has_one_group_per_task_kind_on_real_slide_names(tmp_path, external_cluster):
    """Keys are (kind, run, slide, ...): TCGA-… and CMU-… names do not split the dashboard's groups."""
    slides = [shared_path("slides", "CMU-1-Small-Region.svs"), shared_path("slides", "TCGA-CR-7395-01A-01-TS1.svs")]
    with Client(scheduler_file=external_cluster) as client:
        report = compress(plan_jobs(slides, mpp=0.25), str(tmp_path / "real.zarr"), client, SETTINGS, block=8,
                          progress=False)
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert [s.status for s in report.slides] == ["complete", "complete"], [(s.slide_id, s.error) for s in report.slides]
    assert set(prefixes) <= {"detect-tissue", "encode-block", "finalize-slide"}, prefixes
    assert {"detect-tissue", "encode-block", "finalize-slide"} <= set(prefixes)


@pytest.mark.slow
def test_a_one_block_slide_is_one_task_and_writes_the_same_codes(tmp_path, external_cluster):
    """A slide of one block is encoded and finalized inside its detect-tissue task (the scheduler's
    cost is per task); its codes equal those of the same slide split into four block tasks."""
    from distributed import get_task_stream

    slide = write_synthetic_slide(tmp_path / "small.tif", 1024, 1024, mpp=0.5, seed=5).path
    kinds = {}
    with Client(scheduler_file=external_cluster) as client:
        for block in (8, 4):
            with get_task_stream(client) as stream:
                report = compress(plan_jobs([slide]), str(tmp_path / f"b{block}.zarr"), client, SETTINGS,
                                  block=block, progress=False)
            assert report.slides[0].status == "complete" and report.patches > 0
            kinds[block] = sorted(str(t["key"][0]) for t in stream.data)
    assert kinds[8] == ["detect-tissue"]
    assert kinds[4].count("encode-block") >= 2 and kinds[4].count("finalize-slide") == 1
    np.testing.assert_array_equal(_features(tmp_path / "b8.zarr", "small"), _features(tmp_path / "b4.zarr", "small"))


@pytest.mark.slow
def test_relative_paths_are_resolved_on_the_client(tmp_path, external_cluster, synthetic_slide):
    """The workers run in another directory: --out and --weights relative to the user's folder work."""
    from nic_models.registry import weights_dir

    work = tmp_path / "user"
    (work / "slides").mkdir(parents=True)
    shutil.copy(synthetic_slide, work / "slides" / synthetic_slide.name)
    shutil.copy(weights_dir() / "nic-mtl4-tellez2020.safetensors", work / "w.safetensors")
    done = _nic("compress", "slides", "--out", "rel.zarr", "--weights", "w.safetensors", "--encoder",
                "nic-mtl4-tellez2020", "--scheduler-file", external_cluster, "--block", "16", cwd=work)
    assert done.returncode == 0, done.stderr
    assert "1/1 slides complete" in done.stdout and "patches/s" in done.stdout
    assert (work / "rel.zarr" / SLIDE_ID / "zarr.json").exists()
    manifest = zarr.open_group(str(work / "rel.zarr"), mode="r").attrs["runs"][-1]  # what ran, where, how
    assert manifest["slides"]["complete"] == 1 and manifest["settings"]["encoder"] == "nic-mtl4-tellez2020"
    assert manifest["versions"]["zarr"] == zarr.__version__ and manifest["workers"] == 2


def test_paths_the_workers_cannot_see_are_named(external_cluster):
    with Client(scheduler_file=external_cluster) as client, pytest.raises(NicError, match="cannot see input /nowhere"):
        check_visible(client, ["/nowhere/slide.svs"], "input")


@pytest.mark.slow
def test_a_worker_with_other_package_versions_is_refused(tmp_path):
    """A worker whose environment has another nic-pipeline than the client's: refused before any task."""
    fake = tmp_path / "site"
    meta = fake / "nic_pipeline-9.9.9.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: nic-pipeline\nVersion: 9.9.9\n")
    scheduler_file, processes = start_cluster(tmp_path, n_workers=1, env={"PYTHONPATH": f"{fake}:{os.getcwd()}"})
    try:
        with Client(scheduler_file=scheduler_file) as client, pytest.raises(NicError, match="nic-pipeline 9.9.9"):
            check_versions(client)
    finally:
        stop(processes)


@pytest.mark.slow
def test_waiting_for_workers_ends_with_one_line(tmp_path, synthetic_slide):
    scheduler_file, processes = start_cluster(tmp_path, workers=False)
    try:
        done = _nic("compress", synthetic_slide, "--out", tmp_path / "s.zarr", "--scheduler-file", scheduler_file,
                    "--wait-workers", "2", "--wait-timeout", "3")
    finally:
        stop(processes)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("warning: tcp://") and "plain TCP" in lines[0]  # the scheduler file names tcp://
    assert lines[1:] == [
        f"error: only 0 of 2 Dask workers joined {done.stderr.split('joined ')[1].split(' within')[0]} within 3 s; "
        "start workers (deploy/README.md) or lower --wait-workers"]


@pytest.mark.slow
def test_late_workers_of_another_kind_resume_and_the_store_says_which_ran(tmp_path, synthetic_slide):
    """Started on fp32 workers (a CPU without native bf16) and interrupted, finished on bf16 workers:
    the rerun resumes, and each block records the precision it ran with."""
    scheduler_file, processes = start_cluster(tmp_path, workers=False)
    store = tmp_path / "mixed.zarr"
    try:
        first = start_workers(scheduler_file, tmp_path, 1, {**os.environ, "NIC_CPU_BF16": "0"})
        client_run = subprocess.Popen([sys.executable, "-m", "nic_pipeline", "compress", str(synthetic_slide), "--out",
                                       str(store), "--scheduler-file", scheduler_file, "--block", "4"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and len(list((store / SLIDE_ID / "features" / "c").rglob("*/*/*"))) < 3:
            time.sleep(0.05)
        client_run.kill()
        client_run.wait()
        stop([first])
        processes.append(start_workers(scheduler_file, tmp_path, 1, {**os.environ, "NIC_CPU_BF16": "1"}))
        with Client(scheduler_file=scheduler_file) as client:
            report = compress(plan_jobs([synthetic_slide]), str(store), client, EncoderSettings(), block=4,
                              progress=False)
    finally:
        stop(processes)
    assert report.slides[0].status == "complete" and 0 < report.blocks_encoded
    row = describe_store(store)[0]
    assert row["precisions"] == ["bf16", "fp32"]
    assert zarr.open_group(str(store), mode="r").attrs["compression"]["precision"] == "auto"


@pytest.mark.slow
def test_a_finished_slide_is_checked_again_on_rerun(tmp_path, external_cluster, synthetic_slide):
    """Lost and truncated shards are re-encoded on a plain rerun, flipped bits with --verify; a
    changed file fails unless --redo-changed."""
    slide = tmp_path / synthetic_slide.name
    shutil.copy(synthetic_slide, slide)
    store, jobs = str(tmp_path / "s.zarr"), plan_jobs([slide])
    with Client(scheduler_file=external_cluster) as client:
        clean = compress(jobs, store, client, SETTINGS, block=4, progress=False)
        reference = _features(store)
        shards = sorted(p for p in (Path(store) / SLIDE_ID / "features" / "c").rglob("*/*/*") if p.is_file())
        shards[0].unlink()
        shards[1].write_bytes(shards[1].read_bytes()[:-10])
        rerun = compress(jobs, store, client, SETTINGS, block=4, progress=False)
        assert rerun.blocks_encoded == 2 and np.array_equal(_features(store), reference)
        flipped = bytearray(shards[2].read_bytes())
        flipped[20] ^= 0x40
        shards[2].write_bytes(bytes(flipped))
        assert compress(jobs, store, client, SETTINGS, block=4, progress=False).slides[0].status == "skipped"
        verified = compress(jobs, store, client, SETTINGS, block=4, progress=False, options=RunOptions(verify=True))
        assert verified.blocks_encoded == 1 and np.array_equal(_features(store), reference)

        write_synthetic_slide(slide, 6144, 6144, mpp=0.5, seed=4)  # the file is replaced
        changed = compress(jobs, store, client, SETTINGS, block=4, progress=False)
        assert changed.failed and "the slide file changed" in changed.failed[0].error
        assert "--redo-changed" in changed.failed[0].error
        redone = compress(jobs, store, client, SETTINGS, block=4, progress=False, options=RunOptions(redo_changed=True))
    assert clean.slides[0].status == "complete"
    assert redone.slides[0].status == "complete", redone.slides[0].error
    assert not np.array_equal(_features(store), reference)


@pytest.mark.slow
def test_mpp_fills_in_missing_values_and_is_recorded(tmp_path, external_cluster):
    """--mpp applies to slides without µm/px only (--force-mpp: to all); a corrected value for a
    finished slide is not skipped silently."""
    cmu, tcga = shared_path("slides", "CMU-1-Small-Region.svs"), shared_path("slides", "TCGA-CR-7395-01A-01-TS1.svs")
    store = str(tmp_path / "s.zarr")
    with Client(scheduler_file=external_cluster) as client:
        compress(plan_jobs([cmu, tcga], mpp=0.25), store, client, SETTINGS, block=8, progress=False)
        rows = {r["slide_id"]: r for r in describe_store(store)}
        assert (rows["CMU-1-Small-Region"]["slide_mpp"], rows["CMU-1-Small-Region"]["mpp_source"]) == (0.499, "metadata")
        assert (rows["TCGA-CR-7395-01A-01-TS1"]["slide_mpp"], rows["TCGA-CR-7395-01A-01-TS1"]["mpp_source"]) == (0.25, "given")
        corrected = compress(plan_jobs([tcga], mpp=0.5), store, client, SETTINGS, block=8, progress=False)
        assert "µm/px changed (0.25 -> 0.5)" in corrected.failed[0].error
        compress(plan_jobs([tcga], mpp=0.5), store, client, SETTINGS, block=8, progress=False,
                 options=RunOptions(redo_changed=True))
        forced = str(tmp_path / "forced.zarr")
        compress(plan_jobs([cmu], mpp=0.25, force_mpp=True), forced, client, SETTINGS, block=8, progress=False)
    assert _features(store, "TCGA-CR-7395-01A-01-TS1").shape[1:] == (3567 // 128, 4443 // 128)
    assert describe_store(forced)[0]["mpp_source"] == "forced" and describe_store(forced)[0]["slide_mpp"] == 0.25


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_resumes(tmp_path, synthetic_slide):
    """ENOSPC: the run stops at once with one line, exit 1; on a bigger disk it resumes."""
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        done = _nic("compress", synthetic_slide, "--out", disk / "s.zarr", "--workers", "1", "--block", "4")
        assert done.returncode == 1, done.stderr
        stopped = [line for line in done.stderr.splitlines() if line.startswith("STOPPED")]
        assert len(stopped) == 1 and "no space left" in stopped[0]
        assert "Traceback" not in done.stderr
        shutil.copytree(disk / "s.zarr", tmp_path / "big.zarr")
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    resumed = _nic("compress", synthetic_slide, "--out", tmp_path / "big.zarr", "--workers", "1", "--block", "4")
    assert resumed.returncode == 0, resumed.stderr
