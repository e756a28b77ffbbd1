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

import ast
import contextlib
import ctypes.util
import glob
import logging
import os
import signal
import socket
import sys
import warnings
from typing import Iterator

import dask
from distributed import Client, LocalCluster
from distributed.security import Security

from nic_pipeline.errors import NicError
from nic_pipeline.runtime.device import nvml_gpu_count
from nic_pipeline.runtime.jobqueue import BatchSettings, batch_cluster, resolve
from nic_pipeline.runtime.preflight import warn_unencrypted

# Two runs that start at once may both find 8787 free; the second then gets another port from
# distributed with a 3-line warning. The link `nic` prints names the port it got.
warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)


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


def _guarded(tree: ast.Module, line: int) -> bool:
    """Whether ``line`` of a module lies inside ``if __name__ == "__main__":``."""
    for node in tree.body:
        if isinstance(node, ast.If) and node.lineno <= line <= (node.end_lineno or node.lineno):
            test = node.test
            names = {getattr(part, "id", getattr(part, "value", None)) for part in [test.left, *test.comparators]} \
                if isinstance(test, ast.Compare) else set()
            if {"__name__", "__main__"} <= names:
                return True
    return False


def unguarded_main_script() -> str | None:
    """The path of the main script when it starts the cluster from top-level code outside
    ``if __name__ == "__main__":``, else None.

    Worker processes started by spawn or forkserver (distributed's default) import the main
    script again, as ``__mp_main__``; unguarded, that import starts the cluster again and
    multiprocessing stops it ("...before the current process has finished its bootstrapping
    phase"). Interactive sessions, notebooks and ``python -c`` have no script to import.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec_name = getattr(getattr(main, "__spec__", None), "name", "")
    if path is None or not path.endswith(".py") or spec_name.endswith("__main__"):
        return None  # no script, or `python -m package` (its __main__ is not imported again)
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:  # not called from the script's top level (a thread, a callback)
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
    return None if _guarded(tree, frame.f_lineno) else path


@contextlib.contextmanager
def start_method_for_script():
    """Workers started by ``fork`` when the main script is unguarded (fork does not import it
    again), so the docs' examples run as saved scripts; distributed's own method otherwise.
    Without fork (Windows, macOS) such a script gets one line saying what to add."""
    script = unguarded_main_script()
    if script is None or dask.config.get("distributed.worker.multiprocessing-method") == "fork":
        yield
        return
    if sys.platform != "linux":
        raise NicError(f"{script}: put the code that starts the cluster under `if __name__ == \"__main__\":` "
                       "(worker processes import the script again)")
    with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}):
        yield


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
        warn_unencrypted(scheduler, scheduler_file)
        with _client(scheduler, scheduler_file, security) as client:
            yield client
        return
    if batch is not None:
        batch = resolve(batch)  # GPUs per job, from the partition when not given
        with batch_cluster(batch, security, dashboard_address(dashboard)) as cluster, Client(cluster) as client:
            wait_for_batch_workers(client, gpu=batch.gpus_per_job > 0)
            yield client
        return
    with start_method_for_script():  # for the cluster's life: a nanny restarts its worker the same way
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
