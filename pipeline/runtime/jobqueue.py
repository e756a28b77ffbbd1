"""Worker jobs on a batch system (SLURM, PBS) through dask-jobqueue.

The scheduler runs in the client's process; workers run in batch jobs that dask-jobqueue submits,
scales (``--jobs``) or adapts to the load (``--adapt``). Job settings (partition, cores, memory,
walltime, account, ...) come from Dask's config, ``jobqueue.slurm`` / ``jobqueue.pbs`` in
``~/.config/dask/jobqueue.yaml``, as dask-jobqueue users expect. On top of them NIC adds:

* GPU worker jobs (``gpus_per_job`` > 0): the GPU request (``--gres=gpu:N`` on SLURM,
  ``-l ngpus=N`` on PBS), ``dask cuda worker`` as the worker command (one process per GPU) and a
  ``GPU=1`` resource per worker, so encode and training tasks run one per GPU;
* an optional pool of CPU worker jobs (``cpu_jobs``) for the CPU-side stages, configured by
  ``jobqueue.slurm-cpu`` / ``jobqueue.pbs-cpu`` (keys there override ``jobqueue.slurm``);
* TLS by default: temporary certificates (``Security.temporary()``) handed to the worker jobs
  through files in ``shared-temp-directory`` (default ``~/.nic-tls``), unless certificates are given.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from typing import Iterator

import dask
from distributed.security import Security

_sigint = signal.getsignal(signal.SIGINT)
from dask_jobqueue import PBSCluster, SLURMCluster  # noqa: E402

# dask_jobqueue.runner, imported above, replaces the SIGINT handler with sys.exit() (Ctrl-C would
# exit 0 in silence): put back Python's, which the CLI turns into one line and exit 130.
if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _sigint)

from nic_pipeline.errors import NicError  # noqa: E402

CLUSTERS = {"slurm": SLURMCluster, "pbs": PBSCluster}
GPU_DIRECTIVE = {"slurm": "--gres=gpu:{n}", "pbs": "-l ngpus={n}"}
DEFAULT_TLS_DIR = "~/.nic-tls"


@dataclass(frozen=True)
class BatchSettings:
    """What ``--cluster`` asks of the batch system."""

    system: str  # slurm | pbs
    jobs: int = 1  # worker jobs (the most with adapt)
    adapt: bool = False  # scale between 1 and ``jobs`` with the load
    gpus_per_job: int = 1  # 0: CPU worker jobs
    cpu_jobs: int = 0  # extra CPU worker jobs for the CPU-side stages
    tls: bool = True  # temporary certificates when no others are given


def _config(system: str) -> dict:
    """The dask-jobqueue config section of a batch system."""
    if system not in CLUSTERS:
        raise NicError(f"unknown batch system {system!r}: choose one of {', '.join(CLUSTERS)}")
    return dict(dask.config.get(f"jobqueue.{system}"))


def gpu_job_options(system: str, gpus: int) -> dict:
    """Keywords for GPU worker jobs: the GPU request, ``dask cuda worker``, a GPU resource per worker."""
    config = _config(system)
    return {
        "processes": gpus,  # dask cuda worker starts one worker per visible GPU, named like jobqueue's
        "worker_command": "dask cuda worker",  # run as ``python -m dask cuda worker``
        "job_extra_directives": [*(config.get("job-extra-directives") or []), GPU_DIRECTIVE[system].format(n=gpus)],
        "worker_extra_args": [*(config.get("worker-extra-args") or []), "--resources", "GPU=1"],
    }


def _security(settings: BatchSettings, security: Security | None) -> Security | bool | None:
    """The cluster's security: given certificates, else temporary ones (TLS on), else none."""
    if security is not None:
        return security
    return True if settings.tls else None


def make_cluster(settings: BatchSettings, security: Security | None = None):
    """A dask-jobqueue cluster whose worker jobs follow ``settings``; jobs are not yet submitted."""
    config = _config(settings.system)
    if not config.get("cores") or not config.get("memory"):
        raise NicError(f"set cores and memory per job in jobqueue.{settings.system} of "
                       "~/.config/dask/jobqueue.yaml (see deploy/README.md)")
    options = gpu_job_options(settings.system, settings.gpus_per_job) if settings.gpus_per_job > 0 else {}
    scheduler_options = {"dashboard_address": "127.0.0.1:8787", **(config.get("scheduler-options") or {})}
    shared = config.get("shared-temp-directory") or DEFAULT_TLS_DIR
    os.makedirs(os.path.expanduser(shared), mode=0o700, exist_ok=True)
    try:
        return CLUSTERS[settings.system](
            security=_security(settings, security), shared_temp_directory=shared,
            scheduler_options=scheduler_options, **options,
        )
    except (ValueError, ImportError) as err:  # missing settings, no cryptography for temporary certificates
        raise NicError(f"cannot set up {settings.system} worker jobs: {err}") from err


def cpu_pool(cluster, settings: BatchSettings) -> list:
    """``settings.cpu_jobs`` CPU worker jobs on the cluster's scheduler, configured by the
    ``jobqueue.<system>-cpu`` keys over ``jobqueue.<system>``; not yet submitted."""
    section = f"nic-{settings.system}-cpu"
    merged = {**_config(settings.system), **dict(dask.config.get(f"jobqueue.{settings.system}-cpu", {}) or {})}
    job_kwargs = cluster._job_kwargs
    with dask.config.set({f"jobqueue.{section}": merged}):
        return [
            cluster.job_cls(
                scheduler=cluster.scheduler_address, name=f"nic-cpu-{i}", config_name=section,
                security=job_kwargs["security"], interface=job_kwargs["interface"], protocol=job_kwargs["protocol"],
            )
            for i in range(settings.cpu_jobs)
        ]


@contextlib.contextmanager
def batch_cluster(settings: BatchSettings, security: Security | None = None) -> Iterator:
    """A running jobqueue cluster: worker jobs submitted (or adaptive), CPU pool up; all cancelled on exit."""
    cluster = make_cluster(settings, security)
    with cluster:
        if settings.adapt:
            cluster.adapt(minimum_jobs=1, maximum_jobs=settings.jobs)
        else:
            cluster.scale(jobs=settings.jobs)
        pool = cpu_pool(cluster, settings)
        try:
            for job in pool:
                cluster.sync(job.start)
            yield cluster
        finally:
            for job in pool:
                cluster.sync(job.close)
