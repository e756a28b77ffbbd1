"""Faults from the batch system and the cluster options (issue 21), against the real one-node SLURM
of ``.ci/slurm-up`` (skipped with the reason where it is not running): a worker job that ``sbatch``
refuses ends the command within a minute in one line; with nothing in jobqueue.yaml, worker jobs
are sized from what the partition offers and start; a plain-TCP scheduler is named as such in one
line; a dashboard port in use costs no warning."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import time

import pytest

from tests.deploy.conftest import _slurm_problem
from tests.faults.helpers import nic, noise, one_error_line

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    problem = _slurm_problem()
    if problem:
        pytest.skip(problem)


def jobqueue_config(tmp_path, **slurm) -> dict:
    """DASK_CONFIG for a run whose ``jobqueue.slurm`` holds ``slurm`` over small, local settings."""
    folder = tmp_path / "dask"
    folder.mkdir(exist_ok=True)
    settings = {"walltime": "00:10:00", "interface": "lo", "log-directory": str(tmp_path / "logs"),
                "shared-temp-directory": str(tmp_path / "tls"), **slurm}
    (folder / "jobqueue.yaml").write_text(json.dumps({"jobqueue": {"slurm": settings}}))
    return {"DASK_CONFIG": str(folder)}


def my_jobs(name: str = "dask-worker") -> list[str]:
    """Ids of this user's queued or running jobs of that name (a refused run must leave none)."""
    done = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=30,
                          check=True)
    return done.stdout.split()


def timed(*args, **kwargs):
    started = time.monotonic()
    done = nic(*args, **kwargs)
    return done, time.monotonic() - started


def test_refused_gpu_request_ends_in_one_line_within_a_minute(slurm, good_slides, tmp_path):
    """The issue's case: `--gpus-per-job 1` on a partition without GPUs; sbatch refuses the job.
    It waited forever, with tracebacks."""
    before = set(my_jobs())
    done, seconds = timed("compress", good_slides[0], "--out", tmp_path / "s.zarr", "--cluster", "slurm",
                          "--gpus-per-job", "1", env=jobqueue_config(tmp_path, cores=1, memory="2GiB"), timeout=120)
    assert done.returncode == 2 and seconds < 60, (seconds, done.stderr)
    line = one_error_line(done)
    assert line.startswith('error: sbatch refused the worker job: "Invalid generic resource (gres) specification'), line
    assert "pass --gpus-per-job 0" in line and "ci has no GPUs" in line, line
    assert set(my_jobs()) <= before  # nothing was left queued


def test_refused_partition_names_the_setting(slurm, good_slides, tmp_path):
    done, seconds = timed("compress", good_slides[0], "--out", tmp_path / "s.zarr", "--cluster", "slurm",
                          "--gpus-per-job", "0",
                          env=jobqueue_config(tmp_path, cores=1, memory="2GiB", queue="no-such-partition"), timeout=120)
    assert done.returncode == 2 and seconds < 60, (seconds, done.stderr)
    line = one_error_line(done)
    assert "invalid partition specified: no-such-partition" in line, line
    assert "set queue in jobqueue.slurm" in line, line


def test_job_sizes_come_from_the_partition(slurm, good_slides, tmp_path):
    """Nothing in jobqueue.yaml but walltime and paths, no --gpus-per-job: the worker job asks for
    what sinfo says a node offers, without GPUs, and it starts and compresses. (Without cores and
    memory it was an error; without --gpus-per-job 0, a refusal.)"""
    offer = subprocess.run(["sinfo", "-h", "-p", "ci", "-o", "%c %m %G"], capture_output=True, text=True,
                           timeout=30, check=True).stdout.split()
    cpus, memory_mb = int(offer[0]), int(offer[1])
    done = nic("compress", good_slides[0], "--out", tmp_path / "s.zarr", "--cluster", "slurm", "--block", "8",
               env=jobqueue_config(tmp_path), timeout=400)
    assert done.returncode == 0, done.stderr
    assert f"worker jobs: {cpus} cores, {memory_mb} MiB, no GPUs each (from sinfo, partition ci:" in done.stdout
    assert "1/1 slides complete" in done.stdout
    assert not noise(done), done.stderr
    scripts = [p.read_text() for p in (tmp_path / "logs").glob("*.err")]
    assert scripts and all("Start worker at:      tls://127.0.0.1:" in s for s in scripts)


def test_job_sizes_without_sinfo_answer_are_a_user_error(good_slides, tmp_path):
    """PBS has no sinfo: cores and memory must be set, and the line says where."""
    done = nic("compress", good_slides[0], "--out", tmp_path / "s.zarr", "--cluster", "pbs",
               env=jobqueue_config(tmp_path), timeout=120)
    assert done.returncode == 2
    assert "set cores and memory per job in jobqueue.pbs" in one_error_line(done)


def test_plain_tcp_scheduler_is_named_in_one_line(good_slides, tmp_path):
    done = nic("compress", good_slides[0], "--out", tmp_path / "s.zarr", "--scheduler", "tcp://127.0.0.1:9",
               env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"}, timeout=120)
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [("warning: tcp://127.0.0.1:9 is plain TCP: anyone who can reach it can run code as you, and "
                         "data crosses the network unencrypted; use a tls:// scheduler and certificates "
                         "(deploy/README.md, \"Security on shared clusters\")")], done.stderr
    assert done.returncode == 2 and "cannot reach the Dask scheduler" in one_error_line(done)


def test_dashboard_port_in_use_costs_no_warning(good_slides, tmp_path):
    """Port 8787 taken between the free-port probe and the dashboard's bind (two runs starting at
    once; here a socket bound but not listening): the run takes another port and prints its link,
    without distributed's 3-line "Port 8787 is already in use" warning."""
    with contextlib.closing(socket.socket()) as holder:
        with contextlib.suppress(OSError):  # taken already: the case under test all the same
            holder.bind(("127.0.0.1", 8787))
        done = nic("compress", good_slides[0], "--out", tmp_path / "s.zarr", "--workers", "1", "--block", "8",
                   timeout=300)
    assert done.returncode == 0, done.stderr
    link = re.search(r"^dashboard: http://127\.0\.0\.1:(\d+)/status$", done.stdout, re.MULTILINE)
    assert link and link.group(1) != "8787", done.stdout
    assert "already in use" not in done.stdout + done.stderr and "Hosting the HTTP server" not in done.stderr


@pytest.mark.parametrize("settings, expected", [
    ({"cores": 64, "memory": "2GiB"}, (r"no worker job can start: job \d+ is pending for good \(PartitionConfig\); "
                                       r"lower cores, memory or walltime in jobqueue.slurm")),
    ({"cores": 1, "memory": "2GiB", "job-script-prologue": ["exit 3"]},
     (r"no worker job can start: job (\d+) ended \(failed\) before its worker joined; its output: "
      r".*/logs/dask-worker-\1\.err; fix what the job's output says")),
], ids=["never-starts", "ends-at-once"])
def test_worker_jobs_that_never_bring_a_worker_end_in_one_line(slurm, good_slides, tmp_path, settings, expected):
    """sbatch accepts the job, but it can never start (more CPUs than any node has), or its script
    ends before the worker joins: the command waited forever."""
    done, seconds = timed("compress", good_slides[0], "--out", tmp_path / "s.zarr", "--cluster", "slurm",
                          "--gpus-per-job", "0", env=jobqueue_config(tmp_path, **settings), timeout=180)
    assert done.returncode == 2 and seconds < 90, (seconds, done.stderr)
    line = one_error_line(done)
    assert re.search(expected, line), line
