"""The sbatch scripts of deploy/slurm on a real SLURM cluster: scheduler job, CPU worker job, then
``nic compress`` and ``nic train`` in client jobs, over TLS with the scheduler job's certificates."""

from __future__ import annotations

import json
import stat

import pytest

from tests.deploy.conftest import REPO, cancel, job_environment, sbatch, slide_statuses, wait_for_job

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
