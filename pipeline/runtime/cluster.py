"""Where the task graphs run: an existing Dask cluster, or an embedded local one.

With no scheduler named, :func:`connect` starts a local ``distributed`` cluster: one dask-cuda
worker per GPU when GPUs and dask-cuda are present (each declaring a ``GPU`` resource), CPU
worker processes otherwise. Naming a scheduler address or scheduler file submits to an existing
cluster instead (``dask scheduler`` + ``dask worker`` / ``dask-cuda-worker`` on HPC nodes).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import glob
import logging
import os
from typing import Iterator

from pipeline.errors import NicError
from pipeline.runtime.device import gpu_count


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


def start_local_cluster(workers: int | None = None, threads_per_worker: int = 1, dashboard: bool = True):
    """Start the embedded cluster: dask-cuda workers on GPUs, else ``workers`` CPU processes."""
    import dask
    from distributed import LocalCluster

    address = ":8787" if dashboard else ":0"  # ":0": a free port, never a clash with a running dashboard
    gpus = gpu_count()
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


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    workers: int | None = None,
    dashboard: bool = True,
) -> Iterator["distributed.Client"]:  # noqa: F821
    """A client on the named cluster, or on an embedded local one closed on exit."""
    from distributed import Client

    if scheduler and scheduler_file:
        raise NicError("name either --scheduler or --scheduler-file, not both")
    if scheduler or scheduler_file:
        try:
            client = Client(address=scheduler, scheduler_file=scheduler_file, timeout="30s")
        except (OSError, TimeoutError, ValueError) as err:
            raise NicError(f"cannot reach the Dask scheduler at {scheduler or scheduler_file}: {err}") from err
        with client:
            yield client
        return
    cluster = start_local_cluster(workers, dashboard=dashboard)
    with cluster, Client(cluster) as client:
        yield client


def gpu_resources(client) -> dict | None:
    """``{"GPU": 1}`` when workers declare a GPU resource (dask-cuda-worker --resources GPU=1),
    for pinning encode and training tasks to them; else None."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers) else None
