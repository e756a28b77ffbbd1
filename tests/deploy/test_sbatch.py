"""The sbatch scripts of deploy/slurm on a real SLURM cluster: scheduler job, CPU worker job, then
``nic compress`` and ``nic train`` in client jobs, over TLS with the scheduler job's certificates."""

from __future__ import annotations

import json
import stat
import time

import pytest

from tests.deploy.conftest import REPO, cancel, job_environment, job_state, sbatch, slide_statuses, wait_for_job

SLURM = REPO / "deploy" / "slurm"
SMALL = ("--cpus-per-task=1", "--mem=1G", "--time=00:15:00")


@pytest.mark.slow
def test_sbatch_scripts_compress_and_train(slurm, cohort, tmp_path):
    env = job_environment(NIC_SCHEDULER_FILE=str(tmp_path / "scheduler.json"), NIC_TLS_DIR=str(tmp_path / "tls"),
                          NIC_INTERFACE="lo", NIC_DASHBOARD_ADDRESS=":0", NIC_WAIT="300",
                          NIC_WORKER_LIFETIME="14m", NIC_LIFETIME_STAGGER="30s")
    store, run = tmp_path / "cohort.zarr", tmp_path / "run"
    jobs = [sbatch(SLURM / "scheduler.sbatch", options=SMALL, env=env, log=tmp_path / "scheduler.log")]
    try:
        jobs.append(sbatch(SLURM / "cpu-workers.sbatch", options=("--cpus-per-task=2", "--mem=4G", "--time=00:15:00",
                         f"--dependency=after:{jobs[0]}"), env=env, log=tmp_path / "workers.log"))
        log = tmp_path / "compress.log"
        job = sbatch(SLURM / "client.sbatch", "nic", "compress", str(cohort), "--out", str(store),
                     options=SMALL, env=env, log=log)
        wait_for_job(job, log)
        assert "4/4 slides complete" in log.read_text()
        assert set(slide_statuses(store).values()) == {"complete"}

        log = tmp_path / "train.log"
        job = sbatch(SLURM / "client.sbatch", "nic", "train", str(store), "--labels", str(cohort / "labels.csv"),
                     "--out", str(run), "--model", "mean", "--folds", "2", options=SMALL, env=env, log=log)
        wait_for_job(job, log)
        assert json.loads((run / "metrics.json").read_text())["n_slides"] == 4
        # read while the scheduler runs: a cancelled scheduler removes its file as it exits
        address = json.loads((tmp_path / "scheduler.json").read_text())["address"]
    finally:
        cancel(*jobs)
    # the scheduler spoke TLS only, with certificates only its owner can read
    assert address.startswith("tls://127.0.0.1:")
    assert stat.S_IMODE((tmp_path / "tls" / "key.pem").stat().st_mode) == 0o600


def _run_dir(home, job_id: str):
    """The folder ~/.nic/<cluster>-<job id> of a scheduler job, once it has written its scheduler file."""
    for _ in range(90):
        found = [d for d in (home / ".nic").glob(f"*-{job_id}") if (d / "scheduler.json").is_file()]
        if found and (found[0] / "scheduler.json").stat().st_size:
            return found[0]
        time.sleep(1)
    raise AssertionError(f"scheduler job {job_id} wrote no scheduler file under {home / '.nic'}")


def _ended(job_id: str, log, timeout: float = 120) -> str:
    """Wait until a job ends; its log."""
    deadline = time.monotonic() + timeout
    while job_state(job_id) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING") and time.monotonic() < deadline:
        time.sleep(1)
    return log.read_text() if log.exists() else ""


@pytest.mark.slow
def test_two_scheduler_jobs_keep_their_files_apart(slurm, tmp_path):
    """A user's second cluster has its own scheduler file and certificates (one fixed ~/.nic-tls was
    deleted and remade by the second scheduler job, under the first one's workers), a client job
    joins the cluster it is told, and each cluster's folder leaves with its job."""
    home = tmp_path / "home"
    env = job_environment(HOME=str(home), NIC_INTERFACE="lo", NIC_DASHBOARD_ADDRESS=":0", NIC_WAIT="120")
    for name in ("NIC_SCHEDULER_JOB", "NIC_RUN_DIR", "NIC_SCHEDULER_FILE", "NIC_TLS_DIR", "NIC_DERIVED_FROM"):
        env.pop(name, None)
    jobs = [sbatch(SLURM / "scheduler.sbatch", options=SMALL, env=env, log=tmp_path / "first.log")]
    try:
        first = _run_dir(home, jobs[0])
        key = (first / "tls" / "key.pem").read_bytes()
        address = json.loads((first / "scheduler.json").read_text())["address"]
        jobs.append(sbatch(SLURM / "scheduler.sbatch", options=SMALL, env=env, log=tmp_path / "second.log"))
        second = _run_dir(home, jobs[1])
        assert second != first and (second / "tls" / "key.pem").read_bytes() != key
        assert (first / "tls" / "key.pem").read_bytes() == key  # untouched by the second job
        assert json.loads((first / "scheduler.json").read_text())["address"] == address
        assert json.loads((second / "scheduler.json").read_text())["address"] != address  # two on one node
        assert stat.S_IMODE((second / "tls" / "key.pem").stat().st_mode) == 0o600
        # each scheduler job says where its files are
        assert f"scheduler file {first}/scheduler.json, TLS certificates {first}/tls" in (tmp_path / "first.log").read_text()

        # a client job told NIC_SCHEDULER_JOB joins that cluster, over TLS with its certificates
        probe = ("import sys; from distributed import Client; "
                 "print('joined', Client(scheduler_file=sys.argv[2], timeout=60).scheduler.address)")
        log = tmp_path / "client.log"
        job = sbatch(SLURM / "client.sbatch", "python", "-c", probe, options=SMALL,
                     env={**env, "NIC_SCHEDULER_JOB": jobs[0]}, log=log)
        wait_for_job(job, log, timeout=180)
        assert f"joined {address}" in log.read_text()

        # not told which, with two clusters up: it ends at once, saying what to set
        log = tmp_path / "unsure.log"
        job = sbatch(SLURM / "client.sbatch", "python", "-c", probe, options=SMALL, env=env, log=log)
        text = _ended(job, log)
        assert job_state(job) == "FAILED", text
        assert f"nic: several nic-scheduler jobs of yours run ({' '.join(sorted(jobs, key=int))}): " \
               "export NIC_SCHEDULER_JOB=<the one to join> before sbatch" in text

        cancel(jobs[0])  # the first cluster ends; its folder (and private key) with it, the second's stays
        _ended(jobs[0], tmp_path / "first.log", timeout=60)
        for _ in range(30):
            if not first.exists():
                break
            time.sleep(1)
        assert not first.exists() and (second / "tls" / "key.pem").is_file()
    finally:
        cancel(*jobs)


def test_gpu_worker_job_without_a_gpu_ends_with_one_line(slurm, tmp_path):
    """gpu-workers.sbatch's request is the user's: sbatch options override its defaults (here no
    GPU at all, on the CPU-only test partition), and a job given no GPU ends at once and says why."""
    env = job_environment(NIC_SCHEDULER_FILE=str(tmp_path / "none.json"), NIC_TLS_DIR=str(tmp_path / "tls"))
    log = tmp_path / "gpu.log"
    job = sbatch(SLURM / "gpu-workers.sbatch", options=("--gres=none", *SMALL), env=env, log=log)
    text = _ended(job, log)
    assert job_state(job) == "FAILED", text
    assert f"nic: job {job} has no GPU" in text and "--gres=gpu:N" in text, text
