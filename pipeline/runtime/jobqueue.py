"""Worker jobs on a batch system (SLURM, PBS) through dask-jobqueue.

The scheduler runs in the client's process; workers run in batch jobs that dask-jobqueue submits,
scales (``--jobs``) or adapts to the load (``--adapt``). Job settings (partition, cores, memory,
walltime, account, ...) come from Dask's config, ``jobqueue.slurm`` / ``jobqueue.pbs`` in
``~/.config/dask/jobqueue.yaml``, as dask-jobqueue users expect. On top of them NIC adds:

* job sizes the config leaves out, from what the SLURM partition offers (``sinfo``, read by
  :mod:`nic_pipeline.runtime.slurm`): cores and memory of a node (a GPU job takes its share of
  them), and GPUs (``--gpus-per-job`` unset: 1 where the partition's nodes have GPUs, else CPU
  worker jobs), so that no job asks for what cannot exist;
* GPU worker jobs (``gpus_per_job`` > 0): the GPU request (``--gres=gpu:N`` on SLURM,
  ``-l ngpus=N`` on PBS), ``dask cuda worker`` as the worker command (one process per GPU) and a
  ``GPU=1`` resource per worker, so encode and training tasks run one per GPU;
* an optional pool of CPU worker jobs (``cpu_jobs``) for the CPU-side stages, configured by
  ``jobqueue.slurm-cpu`` / ``jobqueue.pbs-cpu`` (keys there override ``jobqueue.slurm``);
* a refusal by the batch system (``sbatch: error: ...``) ends the command at once with one line
  quoting it and naming the setting that fixes it, instead of tracebacks and a wait for workers
  that never come; so do worker jobs that SLURM will never start, or that end before a worker joins;
* TLS by default: temporary certificates (``Security.temporary()``) handed to the worker jobs
  through files in ``shared-temp-directory`` (default ``~/.nic/jobqueue``), unless certificates are given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Iterator

import dask
from distributed.core import Status
from distributed.security import Security

_sigint = signal.getsignal(signal.SIGINT)
from dask_jobqueue import PBSCluster, SLURMCluster  # noqa: E402

# dask_jobqueue.runner, imported above, replaces the SIGINT handler with sys.exit() (Ctrl-C would
# exit 0 in silence): put back Python's, which the CLI turns into one line and exit 130.
if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _sigint)

from nic_pipeline.errors import NicError  # noqa: E402
from nic_pipeline.runtime.slurm import (  # noqa: E402
    HOPELESS,
    PartitionOffer,
    job_sizes,
    partition_offer,
    slurm_job_states,
)

CLUSTERS = {"slurm": SLURMCluster, "pbs": PBSCluster}
GPU_DIRECTIVE = {"slurm": "--gres=gpu:{n}", "pbs": "-l ngpus={n}"}
SUBMIT_COMMAND = {"slurm": "sbatch", "pbs": "qsub"}
DEFAULT_TLS_DIR = "~/.nic/jobqueue"
DEFAULT_DASHBOARD = "127.0.0.1:0"
"""Localhost, any free port; ``cluster.connect`` asks for 8787 when it is free."""
SUBMIT_TIMEOUT = 50.0
"""Seconds to wait for the batch system to accept or refuse the first worker job."""
POOL_NAME = "nic-cpu-"



@dataclass(frozen=True)
class BatchSettings:
    """What ``--cluster`` asks of the batch system."""

    system: str  # slurm | pbs
    jobs: int = 1  # worker jobs (the most with adapt)
    adapt: bool = False  # scale between 1 and ``jobs`` with the load
    gpus_per_job: int | None = None  # 0: CPU worker jobs; None: from the partition (sinfo), else 1
    cpu_jobs: int = 0  # extra CPU worker jobs for the CPU-side stages
    tls: bool = True  # temporary certificates when no others are given


def _config(system: str) -> dict:
    """The dask-jobqueue config section of a batch system."""
    if system not in CLUSTERS:
        raise NicError(f"unknown batch system {system!r}: choose one of {', '.join(CLUSTERS)}")
    return dict(dask.config.get(f"jobqueue.{system}"))


def resolve(settings: BatchSettings) -> BatchSettings:
    """``settings`` with ``gpus_per_job`` decided: as given, else 1 where the SLURM partition's nodes
    have GPUs and 0 where they have none (1 when ``sinfo`` cannot tell, or on PBS)."""
    if settings.gpus_per_job is not None:
        return settings
    gpus = 1
    if settings.system == "slurm":
        offer = partition_offer(_config("slurm").get("queue"))
        if offer is not None:
            gpus = 1 if offer.gpus else 0
    return dataclasses.replace(settings, gpus_per_job=gpus)


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


# ---------------------------------------------------------------- refusals by the batch system

class Submissions:
    """What the batch system answered to this cluster's job submissions (filled on the event loop)."""

    def __init__(self, system: str, settings: BatchSettings, offer: PartitionOffer | None):
        self.system, self.settings, self.offer = system, settings, offer
        self.accepted: list[str] = []
        self.pool: set[str] = set()  # the accepted jobs of the CPU pool
        self.refused: list[str] = []  # one line each
        self.started = False  # the first jobs are answered: later refusals are warnings

    def refusal(self, err: Exception) -> str:
        """One line: the batch system's own words, then the setting that fixes the request."""
        if self.offer is None and self.system == "slurm":  # what the partition offers, for the fix
            self.offer = partition_offer(_config("slurm").get("queue"))
        return refusal_line(self.system, str(err), self.settings, self.offer)


def refusal_line(system: str, error: str, settings: BatchSettings, offer: PartitionOffer | None = None) -> str:
    """One line for a refused job submission: ``sbatch``'s or ``qsub``'s error lines (from
    dask-jobqueue's error text, which also holds the command and the job script's name), and a fix."""
    stderr = error.split("stderr:", 1)[1] if "stderr:" in error else error
    said = []
    for line in stderr.splitlines():
        line = re.sub(r"^\s*(sbatch|qsub)(: error)?:\s*", "", line).strip()
        if line and line not in said:
            said.append(line)
    quoted = "; ".join(said) or error.strip().splitlines()[-1]
    section = f"jobqueue.{system} in ~/.config/dask/jobqueue.yaml"
    lowered = quoted.lower()
    if "gres" in lowered or "gpu" in lowered:
        where = f" ({offer.partition} has no GPUs)" if offer is not None and not offer.gpus else ""
        fix = f"pass --gpus-per-job 0 for CPU worker jobs{where}, or set queue in {section} to a GPU partition"
    elif "partition" in lowered or "queue" in lowered:
        fix = f"set queue in {section} to a partition that exists (sinfo lists them)"
    elif "account" in lowered or "association" in lowered:
        fix = f"set account in {section} to one of yours (sacctmgr show assoc user=$USER)"
    elif "memory" in lowered or "node configuration" in lowered or "cpu" in lowered:
        fix = f"lower cores or memory in {section}" + (f" ({offer.describe()})" if offer else "")
    elif "time limit" in lowered or "walltime" in lowered:
        fix = f"lower walltime in {section}"
    else:
        fix = f"fix the job settings in {section} (deploy/README.md)"
    return f'{SUBMIT_COMMAND[system]} refused the worker job: "{quoted}"; {fix}'


def _answering(job_cls: type, submissions: Submissions) -> type:
    """``job_cls`` that records the batch system's answer instead of raising on the event loop
    (where a refusal became a logged traceback and the command waited for workers forever)."""

    class AnsweredJob(job_cls):
        async def start(self):
            try:
                await super().start()
            except RuntimeError as err:  # dask-jobqueue: the submit command exited non-zero
                submissions.refused.append(submissions.refusal(err))
                if submissions.started:  # a later job (adapt): the others go on; say so
                    warnings.warn(f"a worker job was not submitted: {submissions.refused[-1]}", stacklevel=1)
                self.job_id = None  # nothing to cancel
                self.status = Status.running
            else:
                submissions.accepted.append(self.job_id)
                if str(self.name).startswith(POOL_NAME):
                    submissions.pool.add(self.job_id)

    AnsweredJob.__name__ = AnsweredJob.__qualname__ = job_cls.__name__
    AnsweredJob.submissions = submissions
    return AnsweredJob


def wait_for_answer(submissions: Submissions, jobs: int, timeout: float = SUBMIT_TIMEOUT) -> None:
    """Block until the batch system answered the first ``jobs`` submissions; a refusal, or no
    answer within ``timeout`` seconds, is a :class:`NicError` of one line."""
    deadline = time.monotonic() + timeout
    while len(submissions.accepted) + len(submissions.refused) < jobs and not submissions.refused:
        if time.monotonic() > deadline:
            raise NicError(f"{SUBMIT_COMMAND[submissions.system]} did not answer within {timeout:g} s "
                           f"({len(submissions.accepted)} of {jobs} worker jobs submitted): is the batch system up (sinfo)?")
        time.sleep(0.1)
    if submissions.refused:
        raise NicError(submissions.refused[0])
    submissions.started = True


def _hopeless(submissions: Submissions, states: dict | None, log: str) -> str | None:
    """A line when no worker job of the cluster (the CPU pool aside) can ever bring a worker: each
    is pending for good, or has ended before its worker joined."""
    main = [job for job in submissions.accepted if job not in submissions.pool]
    if not main or states is None:
        return None
    why = []
    for job in main:
        state, reason = states.get(job, ("ENDED", ""))
        if state == "PENDING" and reason in HOPELESS:
            why.append(f"job {job} is pending for good ({reason})")
        elif state in ("ENDED", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                       "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
            how = "" if state == "ENDED" else f" ({state.lower()})"
            why.append(f"job {job} ended{how} before its worker joined; its output: {log.format(job=job)}")
        else:
            return None  # this one may still start
    fix = ("lower cores, memory or walltime in jobqueue.slurm (sinfo -o '%P %c %m %G %l' lists what partitions "
           "offer)" if any("pending" in w for w in why) else "fix what the job's output says (environment, paths)")
    return f"no worker job can start: {'; '.join(why[:3])}; {fix}"


def wait_for_worker(cluster, submissions: Submissions, gpu: bool, poll: float = 3.0) -> None:
    """Block until a worker (one declaring a GPU when ``gpu``) has joined; on SLURM, a
    :class:`NicError` of one line once every worker job is pending for good or has ended without
    one (the command waited forever)."""
    config = _config(submissions.system)
    log = (f"{config['log-directory']}/{config.get('name') or 'dask-worker'}-{{job}}.err"
           if config.get("log-directory") else "slurm-{job}.out")
    while True:
        workers = cluster.scheduler_info.get("workers", {}).values()
        if any(w.get("resources", {}).get("GPU") for w in workers) if gpu else workers:
            return
        if submissions.system == "slurm" and submissions.accepted:
            line = _hopeless(submissions, slurm_job_states(submissions.accepted), log)
            if line:
                raise NicError(line)
        time.sleep(poll)


# ---------------------------------------------------------------- the cluster

def make_cluster(settings: BatchSettings, security: Security | None = None, dashboard: str = DEFAULT_DASHBOARD):
    """A dask-jobqueue cluster whose worker jobs follow ``settings``; jobs are not yet submitted.
    Cores and memory the config leaves out come from the SLURM partition (``sinfo``)."""
    config = _config(settings.system)
    settings = resolve(settings)
    offer = None
    if settings.system == "slurm" and not (config.get("cores") and config.get("memory")):
        offer = partition_offer(config.get("queue"))
    sizes = job_sizes(config, settings.gpus_per_job, offer)
    if not (config.get("cores") or sizes.get("cores")) or not (config.get("memory") or sizes.get("memory")):
        known = "" if settings.system != "slurm" else " (sinfo could not tell what the partition offers)"
        raise NicError(f"set cores and memory per job in jobqueue.{settings.system} of "
                       f"~/.config/dask/jobqueue.yaml{known} (see deploy/README.md)")
    if sizes:
        gpus = f"{settings.gpus_per_job} GPUs" if settings.gpus_per_job else "no GPUs"
        memory = sizes.get("memory", config.get("memory")).replace("MiB", " MiB")
        print(f"worker jobs: {sizes.get('cores', config.get('cores'))} cores, {memory}, {gpus} each "
              f"(from sinfo, {offer.describe()}; jobqueue.{settings.system} in jobqueue.yaml overrides)", flush=True)
    options = gpu_job_options(settings.system, settings.gpus_per_job) if settings.gpus_per_job > 0 else {}
    scheduler_options = {"dashboard_address": dashboard, **(config.get("scheduler-options") or {})}
    shared = config.get("shared-temp-directory") or DEFAULT_TLS_DIR
    os.makedirs(os.path.expanduser(shared), mode=0o700, exist_ok=True)
    job_cls = _answering(CLUSTERS[settings.system].job_cls, Submissions(settings.system, settings, offer))
    try:
        return CLUSTERS[settings.system](
            security=_security(settings, security), shared_temp_directory=shared, job_cls=job_cls,
            scheduler_options=scheduler_options, **sizes, **options,
        )
    except (ValueError, ImportError) as err:  # missing settings, no cryptography for temporary certificates
        raise NicError(f"cannot set up {settings.system} worker jobs: {err}") from err


def cpu_pool(cluster, settings: BatchSettings) -> list:
    """``settings.cpu_jobs`` CPU worker jobs on the cluster's scheduler, configured by the
    ``jobqueue.<system>-cpu`` keys over ``jobqueue.<system>`` (cores and memory the config leaves
    out: a whole node of the partition, from ``sinfo``); not yet submitted."""
    if settings.cpu_jobs <= 0:
        return []
    section = f"nic-{settings.system}-cpu"
    merged = {**_config(settings.system), **dict(dask.config.get(f"jobqueue.{settings.system}-cpu", {}) or {})}
    if settings.system == "slurm" and not (merged.get("cores") and merged.get("memory")):
        sizes = job_sizes(merged, 0, partition_offer(merged.get("queue")))
        merged.update({key.replace("_", "-"): value for key, value in sizes.items()})
    job_kwargs = cluster._job_kwargs
    with dask.config.set({f"jobqueue.{section}": merged}):
        return [
            cluster.job_cls(
                scheduler=cluster.scheduler_address, name=f"{POOL_NAME}{i}", config_name=section,
                security=job_kwargs["security"], interface=job_kwargs["interface"], protocol=job_kwargs["protocol"],
            )
            for i in range(settings.cpu_jobs)
        ]


@contextlib.contextmanager
def batch_cluster(settings: BatchSettings, security: Security | None = None,
                  dashboard: str = DEFAULT_DASHBOARD) -> Iterator:
    """A running jobqueue cluster: worker jobs submitted (or adaptive), CPU pool up; all cancelled on
    exit. A refusal by the batch system is a :class:`NicError` of one line, within a minute."""
    settings = resolve(settings)
    cluster = make_cluster(settings, security, dashboard)
    submissions = cluster.job_cls.submissions
    with cluster:
        if settings.adapt:
            cluster.adapt(minimum_jobs=1, maximum_jobs=settings.jobs)
        else:
            cluster.scale(jobs=settings.jobs)
        pool = cpu_pool(cluster, settings)
        try:
            for job in pool:
                cluster.sync(job.start)
            wait_for_answer(submissions, (1 if settings.adapt else settings.jobs) + len(pool))
            wait_for_worker(cluster, submissions, gpu=settings.gpus_per_job > 0)
            yield cluster
        finally:
            for job in pool:
                cluster.sync(job.close)
