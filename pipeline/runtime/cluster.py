"""Where the task graphs run: an existing Dask cluster, or an embedded local one.

With no scheduler named, :func:`connect` starts a local ``distributed`` cluster: one dask-cuda
worker per GPU when GPUs and dask-cuda are present (each declaring a ``GPU`` resource), CPU
worker processes otherwise. Naming a scheduler address or scheduler file submits to an existing
cluster instead (``dask scheduler`` + ``dask worker`` / ``dask cuda worker`` on HPC nodes), and
naming a batch system (``--cluster slurm``) submits worker jobs through dask-jobqueue
(:mod:`nic_pipeline.runtime.jobqueue`). With none named, the warm cluster that ``nic cluster start``
left running is used when it answers (:mod:`nic_pipeline.runtime.warm`). Connections use TLS when
certificates are given (flags, or ``distributed.comm.tls`` in the Dask config); the embedded
cluster's dashboard listens on localhost only.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import ctypes.util
import glob
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import uuid
import warnings
import weakref
from typing import Iterator

import dask
from distributed import Client, LocalCluster
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.security import Security

from nic_pipeline.errors import NicError
from nic_pipeline.runtime.device import nvml_gpu_count
from nic_pipeline.runtime.jobqueue import BatchSettings, batch_cluster, resolve
from nic_pipeline.runtime.preflight import warn_unencrypted
from nic_pipeline.runtime.warm import warm_client

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


class DeferredInterrupt:
    """Ctrl-C while the embedded cluster closes: remembered, and raised once the close is done.

    A KeyboardInterrupt thrown into distributed's close leaves it half done (a worker process alive
    to log its heartbeat traceback after ``interrupted:``, or an exit that waits on a stopped event
    loop). A second Ctrl-C stops waiting for the close."""

    def __init__(self):
        self.caught = False
        self._previous = None

    def start(self) -> None:
        if threading.current_thread() is threading.main_thread() and self._previous is None:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def stop(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        if self.caught:
            self.stop()
            raise KeyboardInterrupt
        self.caught = True


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[DeferredInterrupt]:
    """A :class:`DeferredInterrupt` to start where the close begins; its Ctrl-C raised at the end
    (unless an exception, e.g. the first Ctrl-C, is already on its way out)."""
    deferred = DeferredInterrupt()
    try:
        yield deferred
    finally:
        deferred.stop()
    if deferred.caught:
        raise KeyboardInterrupt


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


STARTUP_LOGGERS = ("distributed.nanny", "distributed.core", "distributed.process", "distributed.deploy.spec")
"""Where distributed logs a worker that dies while it starts (``Nanny failed to start``, ``Worker
failed to connect``, each with its traceback, about 60 lines): :func:`start_workers` says it in one line."""


@contextlib.contextmanager
def quiet_loggers(names, level: int = logging.CRITICAL + 1):
    """The named loggers silent for the duration (their own levels restored after)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels):
            logger.setLevel(previous)


def _first_line(err: BaseException | None) -> str:
    """The innermost message of a chained start-up error (``Nanny failed to start worker process``)."""
    while err is not None and err.__cause__ is not None:
        err = err.__cause__
    return str(err).strip().splitlines()[0] if err is not None and str(err).strip() else "no reason given"


def start_workers(cluster, n: int) -> int:
    """Start ``n`` workers on ``cluster`` (made with none) and keep those that start: a worker killed
    or crashed during start-up costs one warning line, not the run (distributed closes the whole
    cluster and raises). None started: NicError, one line. Returns how many run."""
    for _ in range(n):
        cluster.worker_spec.update(cluster.new_worker_spec())
    problem = None
    with quiet_loggers(STARTUP_LOGGERS):
        try:
            cluster.sync(cluster._correct_state)
        except Exception as err:  # noqa: BLE001 - a Nanny that failed to start (any type); the others are up
            problem = err
    failed = [name for name, worker in cluster.workers.items() if worker.status != Status.running]
    failed += [name for name in cluster.worker_spec if name not in cluster.workers]
    if problem is None and not failed:
        return n
    for name in failed:
        cluster.worker_spec.pop(name, None)
        cluster.workers.pop(name, None)
    started = len(cluster.workers)
    if not started:
        with quiet_loggers(STARTUP_LOGGERS):
            cluster.close()
        raise NicError(f"no Dask worker started: {n} of {n} died while starting ({_first_line(problem)}); "
                       "is the machine out of memory, or did something kill them?")
    warnings.warn(f"{n - started} of {n} Dask workers died while starting ({_first_line(problem)}); "
                  f"going on with {started}", RuntimeWarning, stacklevel=2)
    return started


HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"
"""What a worker logs, with a ~25-line traceback, when a heartbeat it sent is cut by the close of
its own comms or of the scheduler's: a race of distributed's close (the heartbeat callback is
stopped, but one already in flight is not awaited), about 1 close in 20."""


class HeartbeatAtClose(logging.Filter):
    """Drops :data:`HEARTBEAT_FAILED` while the worker closes or once the client said the cluster
    is closing (the ``flag`` file exists); the same failure mid-run still shows."""

    def __init__(self, worker, flag: str):
        super().__init__()
        self._worker = weakref.ref(worker)
        self._flag = flag

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(HEARTBEAT_FAILED):
            return True
        worker = self._worker()
        closing = worker is None or worker.status not in (Status.running, Status.paused)
        return not (closing or os.path.exists(self._flag))


class QuietClose(WorkerPlugin):
    """Installs :class:`HeartbeatAtClose` in each worker of the embedded cluster."""

    name = "nic-quiet-close"

    def __init__(self, flag: str):
        self.flag = flag

    def setup(self, worker):
        logging.getLogger("distributed.worker").addFilter(HeartbeatAtClose(worker, self.flag))


def closing_flag() -> str:
    """A path, not yet created, that :func:`orderly_close` creates when the client starts closing
    the embedded cluster; removed when this process exits (after its worker processes)."""
    flag = os.path.join(tempfile.gettempdir(), f"nic-closing-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    atexit.register(_remove_quietly, flag)
    return flag


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def start_local_cluster(workers: int | None = None, threads_per_worker: int = 1, dashboard: bool = True,
                        flag: str | None = None):
    """Start the embedded cluster: dask-cuda workers on GPUs, else ``workers`` CPU processes; a
    worker that dies while starting is left out (:func:`start_workers`). ``flag``: the file whose
    existence tells the workers that the close is orderly (:class:`HeartbeatAtClose`)."""
    address = dashboard_address(dashboard)
    plugins = {"plugins": {QuietClose(flag)}} if flag else {}
    gpus = nvml_gpu_count()
    with sigint_ignored():
        if gpus:
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                LocalCUDACluster = None
            if LocalCUDACluster is not None:
                try:
                    with quiet_loggers(STARTUP_LOGGERS):
                        return LocalCUDACluster(
                            n_workers=workers or gpus, threads_per_worker=threads_per_worker,
                            resources={"GPU": 1}, dashboard_address=address, silence_logs=logging.ERROR,
                            **plugins,
                        )
                except Exception as err:  # dask-cuda needs a worker per GPU at once: no partial start
                    raise NicError(f"the GPU workers did not start: {_first_line(err)}") from err
        environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **_worker_environment()}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = LocalCluster(
                n_workers=0,
                threads_per_worker=threads_per_worker,
                processes=True,
                dashboard_address=address,
                silence_logs=logging.ERROR,
                **plugins,
            )
            try:
                start_workers(cluster, workers or os.cpu_count() or 1)
            except BaseException:
                cluster.close()
                raise
            return cluster


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
    warm: bool = True,
) -> Iterator[Client]:
    """A client on the named cluster, on worker jobs of a batch system, on the warm cluster of
    ``nic cluster start`` (when ``warm`` and it answers; one line says so), or on an embedded local
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
    running = warm_client() if warm else None
    if running is not None:
        with running as client:
            yield client
        return
    flag = closing_flag()
    # start method: for the cluster's life, as a nanny restarts its worker the same way
    with start_method_for_script(), interrupts_deferred() as deferred:
        cluster = start_local_cluster(workers, dashboard=dashboard, flag=flag)
        with cluster, Client(cluster) as client:
            try:
                yield client
            finally:  # Ctrl-C or not, the close from here on is ours: not a failure, not to interrupt
                deferred.start()
                with contextlib.suppress(OSError):
                    open(flag, "x").close()


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
