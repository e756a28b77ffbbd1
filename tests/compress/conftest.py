"""Fixtures of the compression tests: a cluster started with the `dask` commands, a synthetic slide."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import Client

from nic_pipeline.synth import write_synthetic_slide

DASK = str(Path(sys.executable).with_name("dask"))
"""The `dask` command of this interpreter's environment (found without activating the venv)."""


def start_cluster(folder, n_workers: int = 2, env: dict | None = None, workers: bool = True):
    """`dask scheduler` and `dask worker` processes, as on an HPC node: (scheduler file, processes)."""
    scheduler_file = folder / "scheduler.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    processes = [subprocess.Popen(
        [DASK, "scheduler", "--scheduler-file", str(scheduler_file), "--port", "0", "--dashboard-address", ":0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )]
    deadline = time.time() + 60
    while not scheduler_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    if workers:
        processes.append(start_workers(scheduler_file, folder, n_workers, env))
    return str(scheduler_file), processes


def start_workers(scheduler_file, folder, n_workers: int, env: dict):
    """`dask worker` processes (single-threaded) joining the scheduler; waits until they have."""
    process = subprocess.Popen(
        [DASK, "worker", "--scheduler-file", str(scheduler_file), "--nworkers", str(n_workers), "--nthreads", "1",
         "--local-directory", str(folder), "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True, cwd=str(folder),
    )
    with Client(scheduler_file=str(scheduler_file)) as client:
        client.wait_for_workers(n_workers, timeout=120)
    return process


def stop(processes) -> None:
    for process in reversed(processes):
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory):
    """A scheduler and two single-threaded worker processes started with the `dask` commands,
    as on an HPC node; yields the scheduler file."""
    scheduler_file, processes = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield scheduler_file
    stop(processes)


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory):
    """A 6,144 px square synthetic slide at 0.5 µm/px with about 40% tissue."""
    path = tmp_path_factory.mktemp("slides") / "synth_kill.tif"
    write_synthetic_slide(path, 6144, 6144, mpp=0.5, seed=3)
    return path


