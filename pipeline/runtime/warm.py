"""A warm cluster: the embedded local cluster kept running between commands (``nic cluster``).

``nic cluster start`` spawns a small daemon process (``python -m nic_pipeline.runtime.warm``, in a
session of its own) that starts the embedded cluster exactly as :func:`connect` does
(:func:`nic_pipeline.runtime.cluster.start_local_cluster`: the same worker environment, allocator
and GPU settings), then writes a Dask scheduler file at :func:`cluster_file`: the scheduler's
``identity()``, the format ``dask scheduler --scheduler-file`` writes, so ``--scheduler-file`` and
``distributed.Client(scheduler_file=...)`` read it; a ``nic`` key adds the daemon's pid, host and
environment. The file appears only once the workers are up. Later commands given no cluster find
it (:func:`warm_client`) and run there, so the cluster start and the encoder load (the workers'
``NicWorker`` plugin keeps it) are paid once. ``nic cluster stop`` sends the daemon SIGTERM; it
closes the cluster and removes the file (SIGKILL of its process group after a deadline).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from nic_pipeline.errors import NicError

CLUSTER_FILE_ENV = "NIC_CLUSTER_FILE"
"""Environment variable naming the warm cluster's scheduler file instead of :func:`cluster_file`'s default."""

EMBEDDED = "; starting an embedded one"

PROBE_S = 2.0
"""How long a command waits for the warm cluster's scheduler to answer before it starts its own."""

START_DEADLINE_S = 180.0
"""How long ``nic cluster start`` waits for the daemon's workers (GPU workers import CUDA first)."""

STOP_DEADLINE_S = 30.0
"""How long ``nic cluster stop`` waits for an orderly close before it kills the process group."""

DAEMON_MODULE = "nic_pipeline.runtime.warm"

FINGERPRINT_PREFIXES = ("NIC_", "CUDA_VISIBLE_DEVICES", "DASK_")
"""Environment variables that change what the workers do: a command whose own differ from the warm
cluster's (which keeps those of ``nic cluster start``) runs on an embedded cluster instead."""


def cluster_file() -> Path:
    """The warm cluster's scheduler file: ``$NIC_CLUSTER_FILE``, else
    ``$XDG_CACHE_HOME/nic/cluster-<host>.json`` (``~/.cache/nic/...``): per user (a file another
    user could replace would point your commands at their scheduler) and per machine (a home
    directory shared by the nodes of an HPC system holds one file per node, each naming a
    localhost scheduler)."""
    named = os.environ.get(CLUSTER_FILE_ENV)
    if named:
        return Path(named).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "nic" / f"cluster-{socket.gethostname()}.json"


def log_file(path: Path) -> Path:
    """Where the daemon's output goes: beside its scheduler file."""
    return path.with_suffix(".log")


def fingerprint() -> dict:
    """What the workers inherit from the process that starts them and a later command may not share."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FINGERPRINT_PREFIXES) and k != CLUSTER_FILE_ENV}
    return {"python": sys.executable, "env": env}


def read_record(path: Path) -> dict | None:
    """The scheduler file's contents, or None when absent or unreadable (half written, not JSON)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("address") else None


def _alive(pid: int | None) -> bool:
    """Whether ``pid`` is the warm-cluster daemon (not a process that reused its id)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return DAEMON_MODULE.encode() in handle.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): the process exists, whatever it runs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _answers(address: str, timeout: float = PROBE_S) -> bool:
    """Whether something accepts connections at a ``tcp://host:port`` address within ``timeout``."""
    parsed = urlparse(address)
    if not parsed.hostname or not parsed.port:
        return False
    with contextlib.closing(socket.socket(socket.AF_INET6 if ":" in parsed.hostname else socket.AF_INET)) as probe:
        probe.settimeout(timeout)
        return probe.connect_ex((parsed.hostname, parsed.port)) == 0


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def live_record(path: Path | None = None, say=None, then: str = "") -> dict | None:
    """The warm cluster's record when its scheduler answers; a stale file (daemon or scheduler
    gone) is removed with one line to ``say`` (ending in ``then``); None when there is none."""
    path = path or cluster_file()
    if not path.exists():
        return None
    record = read_record(path)
    if record is None:
        return None  # being written, or not ours to judge: leave it
    pid = record.get("nic", {}).get("pid")
    daemon = _alive(pid) if pid is not None else None  # None: a file `dask scheduler` wrote, no daemon to ask
    if daemon is not False and _answers(record["address"]):
        return record
    if daemon:  # alive but silent (stopped, swapping): not stale, not to use
        if say:
            say(f"cluster: the warm cluster at {record['address']} does not answer within {PROBE_S:g} s "
                "(nic cluster stop ends it)" + then)
        return None
    _remove(path)
    if say:
        say(f"cluster: the warm cluster at {record['address']} is gone (stale {path} removed){then}")
    return None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def warm_client(say=_say):
    """A client on the warm cluster, with one line saying so; None (after one line where there is
    something to say) when there is no warm cluster, it is gone, or it does not answer."""
    path = cluster_file()
    record = live_record(path, say, then=EMBEDDED)
    if record is None:
        return None
    theirs, ours = record.get("nic", {}).get("fingerprint"), fingerprint()
    if theirs is not None and theirs != ours:
        differ = sorted(k for k in {**theirs["env"], **ours["env"]} if theirs["env"].get(k) != ours["env"].get(k))
        what = ", ".join(differ) if differ else f"python {theirs['python']}"
        say(f"cluster: the warm cluster at {record['address']} was started with another environment "
            f"({what}){EMBEDDED}")
        return None
    from distributed import Client

    try:
        client = Client(scheduler_file=str(path), timeout=PROBE_S + 3)
    except (OSError, TimeoutError, ValueError) as err:
        say(f"cluster: the warm cluster at {record['address']} does not answer ({err}){EMBEDDED}")
        return None
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    say(f"cluster: using the warm cluster at {record['address']} ({workers} workers; nic cluster stop to end it)")
    return client


# -- nic cluster start / status / stop ------------------------------------------------------------


@contextlib.contextmanager
def _start_lock(path: Path):
    """One ``nic cluster start`` at a time per file: a second one waits here, then finds the first's cluster."""
    import fcntl

    with open(path.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def start(workers: int | None = None, threads_per_worker: int = 1, deadline_s: float = START_DEADLINE_S) -> dict:
    """Start the warm cluster's daemon and wait until its scheduler file is written; its record.
    NicError (one line) when one already runs or the daemon dies or overruns ``deadline_s``."""
    import subprocess

    path = cluster_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _start_lock(path):
        record = live_record(path, _say)
        if record is not None:
            raise NicError(f"a warm cluster is already running at {record['address']} "
                           f"({record.get('n_workers', '?')} workers); `nic cluster stop` first")
        silent = read_record(path)
        if silent is not None and _alive(silent.get("nic", {}).get("pid")):
            raise NicError(f"the warm cluster at {silent['address']} does not answer; `nic cluster stop` ends it")
        _remove(path)  # unreadable leftovers
        log = log_file(path)
        command = [sys.executable, "-m", DAEMON_MODULE, "--file", str(path), "--threads-per-worker",
                   str(threads_per_worker)]
        if workers:
            command += ["--workers", str(workers)]
        with open(log, "w") as out:
            daemon = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, close_fds=True)
        ends = time.monotonic() + deadline_s
        while time.monotonic() < ends:
            record = read_record(path)
            if record is not None and record.get("nic", {}).get("pid") == daemon.pid:
                return record
            if daemon.poll() is not None:
                raise NicError(f"the warm cluster did not start: {_last_line(log)} (log: {log})")
            time.sleep(0.1)
        _kill_group(daemon.pid)
        daemon.wait(timeout=10)
        raise NicError(f"the warm cluster did not start within {deadline_s:.0f} s; stopped it (log: {log})")


def _last_line(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return "no output"


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def worker_view(dask_worker=None) -> dict:
    """``client.run`` target: this worker's pid and the encoders its ``NicWorker`` plugin holds."""
    plugin = dask_worker.plugins.get("nic-worker") if dask_worker is not None else None
    encoders = []
    for key, loaded in list((getattr(plugin, "_encoders", None) or {}).items()):
        name = getattr(getattr(getattr(loaded, "module", None), "spec", None), "name", key)
        encoders.append(f"{name} ({getattr(loaded, 'device', '?')}, {getattr(loaded, 'precision', '?')})")
    return {"pid": os.getpid(), "encoders": encoders}


def status(timeout: float = 10.0) -> dict | None:
    """The warm cluster as its scheduler reports it: address, dashboard, uptime, and per worker its
    threads, pid and loaded encoders; None when there is none (a stale file is removed)."""
    path = cluster_file()
    record = live_record(path, _say)
    if record is None:
        return None
    from distributed import Client

    try:
        with Client(scheduler_file=str(path), timeout=timeout) as client:
            info = client.scheduler_info(n_workers=-1)
            views = client.run(worker_view, on_error="return")
            dashboard = client.dashboard_link
    except (OSError, TimeoutError) as err:
        raise NicError(f"the warm cluster at {record['address']} does not answer: {err}") from err
    workers = {address: {"nthreads": w["nthreads"], "memory_limit": w["memory_limit"],
                         **(views.get(address) if isinstance(views.get(address), dict) else {})}
               for address, w in sorted(info["workers"].items())}
    return {"file": str(path), "address": record["address"], "dashboard": dashboard,
            "uptime_s": time.time() - info.get("started", record.get("started", time.time())),
            "pid": record.get("nic", {}).get("pid"), "workers": workers}


def stop(deadline_s: float = STOP_DEADLINE_S) -> str | None:
    """Stop the warm cluster (its address), or None when there was none. The daemon gets SIGTERM
    and ``deadline_s`` to close its workers; then its whole process group gets SIGKILL."""
    path = cluster_file()
    record = read_record(path)
    if record is None:
        _remove(path)
        return None
    pid = record.get("nic", {}).get("pid")
    if not _alive(pid):
        if pid is None and _answers(record["address"]):  # a scheduler file that nic did not write
            raise NicError(f"{path} names a scheduler that `nic cluster start` did not start ({record['address']}); "
                           "stop it as it was started")
        _remove(path)
        return None
    os.kill(pid, signal.SIGTERM)
    ends = time.monotonic() + deadline_s
    while _alive(pid) and time.monotonic() < ends:
        time.sleep(0.1)
    if _alive(pid) or _group_alive(pid):
        _kill_group(pid)
        time.sleep(0.2)
    _remove(path)
    return record["address"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# -- the daemon ----------------------------------------------------------------------------------


def _write_record(path: Path, record: dict) -> None:
    """Write the scheduler file at once (a reader never sees half of it), readable by its user only."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        json.dump(record, handle, indent=2)
    os.replace(partial, path)


def serve(path: Path, workers: int | None, threads_per_worker: int) -> int:
    """The daemon: the embedded cluster, its scheduler file, until SIGTERM/SIGINT/SIGHUP or the
    scheduler closes (``client.shutdown()``); then an orderly close and the file removed."""
    import threading

    from distributed.core import Status

    from nic_pipeline.runtime.cluster import closing_flag, start_local_cluster

    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stopping.set())
    flag = closing_flag()
    started_with = fingerprint()  # before the nannies start: they set OMP_NUM_THREADS & co. while they spawn
    cluster = start_local_cluster(workers, threads_per_worker=threads_per_worker, dashboard=True, flag=flag)
    try:
        record = cluster.scheduler.identity(n_workers=0)
        record["workers"] = {}
        record["nic"] = {"pid": os.getpid(), "host": socket.gethostname(), "log": str(log_file(path)),
                         "dashboard": cluster.dashboard_link, "fingerprint": started_with}
        _write_record(path, record)
        print(f"warm cluster at {record['address']}, {record['n_workers']} workers, file {path}", flush=True)
        while not stopping.wait(0.5):
            if cluster.scheduler.status not in (Status.running, Status.init):
                break
    finally:
        with contextlib.suppress(OSError):
            open(flag, "x").close()
        current = read_record(path)
        if current is not None and current.get("nic", {}).get("pid") == os.getpid():
            _remove(path)
        with contextlib.suppress(Exception):  # the scheduler may be closed already
            cluster.close(timeout=STOP_DEADLINE_S - 5)
        print("warm cluster closed", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {DAEMON_MODULE}", description="The warm cluster's daemon "
                                     "(started by `nic cluster start`).")
    parser.add_argument("--file", required=True, type=Path)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    args = parser.parse_args(argv)
    return serve(args.file, args.workers, args.threads_per_worker)


if __name__ == "__main__":
    sys.exit(main())
