"""``--cluster slurm|pbs`` on dask-jobqueue: the job scripts it writes (GPU request, `dask cuda worker`,
GPU resource, CPU pool settings), and compress + train end to end on the real SLURM cluster."""

from __future__ import annotations

import json

import dask
import pytest

from nic_pipeline.errors import NicError
from nic_pipeline.runtime.jobqueue import BatchSettings, cpu_pool, make_cluster
from tests.deploy.conftest import job_environment, nic, slide_statuses

JOB = {"cores": 4, "memory": "8GiB", "walltime": "01:00:00", "queue": "gpu"}


@pytest.mark.parametrize("system, gpu_line, queue_line, cpu_request", [
    ("slurm", "#SBATCH --gres=gpu:2", "#SBATCH -p ", "--cpus-per-task=8"),
    ("pbs", "#PBS -l ngpus=2", "#PBS -q ", "ncpus=8"),
])
def test_gpu_worker_jobs_request_gpus_and_declare_the_resource(system, gpu_line, queue_line, cpu_request, tmp_path):
    config = {**{f"jobqueue.{system}.{k}": v for k, v in JOB.items()},
              f"jobqueue.{system}.shared-temp-directory": str(tmp_path),
              f"jobqueue.{system}-cpu": {"queue": "cpu", "cores": 8}}
    with dask.config.set(config):
        with make_cluster(BatchSettings(system, gpus_per_job=2, cpu_jobs=1)) as cluster:
            script = cluster.job_script()
            cpu_script = cpu_pool(cluster, BatchSettings(system, cpu_jobs=1))[0].job_script()
    assert gpu_line in script
    assert "-m dask cuda worker tls://" in script  # TLS with temporary certificates by default
    assert "--resources GPU=1" in script and "--tls-key" in script
    assert f"{queue_line}gpu\n" in script and f"{queue_line}cpu\n" in cpu_script  # jobqueue.<system>-cpu
    assert gpu_line not in cpu_script and "GPU=1" not in cpu_script
    assert "-m distributed.cli.dask_worker" in cpu_script and cpu_request in cpu_script


def test_missing_job_sizes_are_a_user_error(tmp_path):
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        with pytest.raises(NicError, match="jobqueue.yaml"):
            make_cluster(BatchSettings("slurm"))


@pytest.mark.slow
def test_cluster_slurm_compress_and_train(slurm, cohort, tmp_path):
    config_dir = tmp_path / "dask"
    config_dir.mkdir()
    (config_dir / "jobqueue.yaml").write_text(json.dumps({"jobqueue": {"slurm": {
        "cores": 2, "memory": "4GiB", "processes": 2, "walltime": "00:15:00", "interface": "lo",
        "log-directory": str(tmp_path / "logs"), "shared-temp-directory": str(tmp_path / "tls")}}}))
    env = job_environment(DASK_CONFIG=str(config_dir))
    store, run = tmp_path / "cohort.zarr", tmp_path / "run"
    out = nic("compress", str(cohort), "--out", str(store), "--cluster", "slurm", "--gpus-per-job", "0",
              "--cpu-jobs", "1", env=env)
    assert "dashboard: http://127.0.0.1:" in out and "4/4 slides complete" in out
    assert set(slide_statuses(store).values()) == {"complete"}
    nic("train", str(store), "--labels", str(cohort / "labels.csv"), "--out", str(run), "--model", "mean",
        "--folds", "2", "--cluster", "slurm", "--gpus-per-job", "0", "--adapt", "--jobs", "2", env=env)
    assert json.loads((run / "metrics.json").read_text())["n_slides"] == 4
    # the worker jobs ran under SLURM and spoke TLS
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.err"))
    assert "Start worker at:      tls://127.0.0.1:" in logs
