"""Where the task graphs run: an existing Dask cluster, or an embedded local one.

With no scheduler named, :func:`connect` starts a local ``distributed`` cluster: one dask-cuda
worker per GPU when GPUs and dask-cuda are present (each declaring a ``GPU`` resource), CPU
worker processes otherwise. Naming a scheduler address or scheduler file submits to an existing
cluster instead (``dask scheduler`` + ``dask worker`` / ``dask cuda worker`` on HPC nodes), and
naming a batch system (``--cluster slurm``) submits worker jobs through dask-jobqueue
(:mod:`nic_pipeline.runtime.jobqueue`). Connections use TLS when certificates are given (flags, or
``distributed.comm.tls`` in the Dask config); the embedded cluster's dashboard listens on localhost only.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import glob
import logging
import os
import signal
import socket
from typing import Iterator

import dask
from distributed import Client, LocalCluster
from distributed.security import Security

from nic_pipeline.errors import NicError
from nic_pipeline.runtime.device import nvml_gpu_count
from nic_pipeline.runtime.jobqueue import BatchSettings, batch_cluster


def tcmalloc_path() -> str | None:
    """A tcmalloc shared library, if installed: glibc's allocator page-faults its way through
    PyTorch's large temporary buffers and can halve CPU throughput."""
    found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if found and os.path.isabs(found):
        return found
    candidates = sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so*") + glob.glob("/usr/lib/*/libtcmalloc.so*"))
    return candidates[0] if candidates else None


def _worker_environment() -> dict[str, str]:
    """Environment for spawned workers: tcmalloc preloaded when available."""
    env = {}
    tcmalloc = tcmalloc_path()
    if tcmalloc and os.environ.get("NIC_NO_TCMALLOC") != "1":
        env["LD_PRELOAD"] = tcmalloc
    return env


def dashboard_address(wanted: bool = True, port: int = 8787) -> str:
    """Where the embedded dashboard listens: localhost only (it has no authentication), on 8787
    when that port is free, else on any free port (a second job on one machine gets its own,
    without distributed's warning about the clash)."""
    if wanted:
        with contextlib.closing(socket.socket()) as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return f"127.0.0.1:{port}"
    return "127.0.0.1:0"


@contextlib.contextmanager
def sigint_ignored():
    """Start processes that ignore Ctrl-C: the terminal sends SIGINT to the whole process group,
    and the client, not each worker, should answer it (one line, then the cluster closes)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_local_cluster(workers: int | None = None, threads_per_worker: int = 1, dashboard: bool = True):
    """Start the embedded cluster: dask-cuda workers on GPUs, else ``workers`` CPU processes."""
    address = dashboard_address(dashboard)
    gpus = nvml_gpu_count()
    with sigint_ignored():
        if gpus:
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                LocalCUDACluster = None
            if LocalCUDACluster is not None:
                return LocalCUDACluster(
                    n_workers=workers or gpus, threads_per_worker=threads_per_worker,
                    resources={"GPU": 1}, dashboard_address=address, silence_logs=logging.ERROR,
                )
        environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **_worker_environment()}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            return LocalCluster(
                n_workers=workers or os.cpu_count() or 1,
                threads_per_worker=threads_per_worker,
                processes=True,
                dashboard_address=address,
                silence_logs=logging.ERROR,
            )


def tls_security(ca_file: str | None = None, cert: str | None = None, key: str | None = None) -> Security | None:
    """TLS for every role from certificate files (``--tls-ca-file/--tls-cert/--tls-key``), or None
    when none is given: Dask then reads ``distributed.comm.tls`` from its config."""
    given = [ca_file, cert, key]
    if not any(given):
        return None
    if not all(given):
        raise NicError("TLS needs all of --tls-ca-file, --tls-cert and --tls-key")
    roles = {f"tls_{role}_{part}": path for role in ("client", "scheduler", "worker")
             for part, path in (("cert", cert), ("key", key))}
    return Security(tls_ca_file=ca_file, require_encryption=True, **roles)


def _client(scheduler: str | None, scheduler_file: str | None, security: Security | None) -> Client:
    """A client on an existing scheduler, errors the user can fix as NicError."""
    try:
        return Client(address=scheduler, scheduler_file=scheduler_file, security=security,
                      timeout=dask.config.get("distributed.comm.timeouts.connect"))  # 30 s unless configured
    except (OSError, TimeoutError, ValueError, TypeError) as err:  # TypeError: a tls:// address, no certificates
        hint = ""
        if "tls" in str(err).lower() or "ssl" in str(err).lower():
            hint = " (a TLS scheduler: give its certificates with --tls-ca-file/--tls-cert/--tls-key or Dask config)"
        raise NicError(f"cannot reach the Dask scheduler at {scheduler or scheduler_file}: {err}{hint}") from err


def wait_for_batch_workers(client: Client, gpu: bool) -> None:
    """Block until a worker job has joined (one declaring a GPU when ``gpu``): jobs may queue a while,
    and tasks pin to GPU workers only once one is known."""
    client.wait_for_workers(1)
    while gpu and gpu_resources(client) is None:
        client.wait_for_workers(len(client.scheduler_info(n_workers=-1)["workers"]) + 1)


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    workers: int | None = None,
    dashboard: bool = True,
    security: Security | None = None,
    batch: BatchSettings | None = None,
) -> Iterator[Client]:
    """A client on the named cluster, on worker jobs of a batch system, or on an embedded local
    cluster; clusters started here are closed (their jobs cancelled) on exit."""
    if sum(bool(x) for x in (scheduler, scheduler_file, batch)) > 1:
        raise NicError("name one of --scheduler, --scheduler-file or --cluster")
    if scheduler or scheduler_file:
        with _client(scheduler, scheduler_file, security) as client:
            yield client
        return
    if batch is not None:
        with batch_cluster(batch, security) as cluster, Client(cluster) as client:
            wait_for_batch_workers(client, gpu=batch.gpus_per_job > 0)
            yield client
        return
    cluster = start_local_cluster(workers, dashboard=dashboard)
    with cluster, Client(cluster) as client:
        yield client


@contextlib.contextmanager
def client_or_embedded(client: Client | None, **connect_options) -> Iterator[Client]:
    """``client`` as it is, or the embedded cluster for the duration of the call."""
    if client is not None:
        yield client
        return
    with connect(**connect_options) as own:
        yield own


def gpu_resources(client) -> dict | None:
    """``{"GPU": 1}`` when workers declare a GPU resource (dask-cuda-worker --resources GPU=1),
    for pinning encode and training tasks to them; else None."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers) else None
