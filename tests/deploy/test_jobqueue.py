"""``--cluster slurm|pbs`` on dask-jobqueue: the job scripts it writes (GPU request, `dask cuda worker`,
GPU resource, CPU pool settings), and compress + train end to end on the real SLURM cluster."""

from __future__ import annotations

import json

import dask
import pytest

from nic_pipeline.errors import NicError
from nic_pipeline.runtime.jobqueue import BatchSettings, cpu_pool, make_cluster, refusal_line
from nic_pipeline.runtime.slurm import PartitionOffer, gres_gpus, job_sizes, parse_sinfo
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
    """Without cores and memory in the config and no sinfo to tell (PBS; a partition sinfo does not
    know), the line says where to set them."""
    sizes = {"cores": None, "memory": None, "shared-temp-directory": str(tmp_path)}
    with dask.config.set({**{f"jobqueue.pbs.{k}": v for k, v in sizes.items()},
                          **{f"jobqueue.slurm.{k}": v for k, v in sizes.items()}, "jobqueue.slurm.queue": "nowhere"}):
        with pytest.raises(NicError, match="jobqueue.yaml"):
            make_cluster(BatchSettings("pbs"))
        with pytest.raises(NicError, match="sinfo could not tell"):
            make_cluster(BatchSettings("slurm", gpus_per_job=0))


@pytest.mark.parametrize("gres, gpus", [("(null)", 0), ("gpu:4", 4), ("gpu:a100:4(S:0-1)", 4),
                                        ("gpu:a100:2,gpu:v100:2,mps:400", 4), ("mps:100", 0)])
def test_gpus_per_node_from_the_gres_field(gres, gpus):
    assert gres_gpus(gres) == gpus


def test_partition_offer_from_sinfo_rows():
    rows = "cpu*|64|256000|(null)\ngpu|32|512000|gpu:a100:4(S:0-1)\ngpu|48|768000|gpu:h100:8\ngpu|16|64000|(null)\n"
    assert parse_sinfo(rows) == PartitionOffer("cpu", 64, 256000, 0)  # the default partition
    assert parse_sinfo(rows, "gpu") == PartitionOffer("gpu", 32, 512000, 4)  # GPU nodes, the smallest
    assert parse_sinfo(rows, "nowhere") is None
    # a GPU job takes its GPUs' share of a node; a CPU job the node; set keys stay the config's
    offer = PartitionOffer("gpu", 32, 512000, 4)
    assert job_sizes({}, 1, offer) == {"cores": 8, "memory": "128000MiB", "job_mem": "128000M"}
    assert job_sizes({"cores": 4}, 0, offer) == {"memory": "512000MiB", "job_mem": "512000M"}
    assert job_sizes({"cores": 4, "memory": "8GiB"}, 1, offer) == {}


def test_refusal_line_quotes_sbatch_and_names_the_fix():
    error = ("Command exited with non-zero exit code.\nExit code: 1\nCommand:\nsbatch /tmp/tmpx.sh\nstdout:\n\n"
             "stderr:\nsbatch: error: Memory specification can not be satisfied\n"
             "sbatch: error: Batch job submission failed: Requested node configuration is not available\n")
    line = refusal_line("slurm", error, BatchSettings("slurm", gpus_per_job=0), PartitionOffer("ci", 2, 1000, 0))
    assert line == ('sbatch refused the worker job: "Memory specification can not be satisfied; Batch job submission '
                    'failed: Requested node configuration is not available"; lower cores or memory in jobqueue.slurm '
                    'in ~/.config/dask/jobqueue.yaml (partition ci: 2 CPUs, 1.0 GiB, no GPUs per node)')


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
