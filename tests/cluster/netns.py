"""Several "hosts" on one machine: Linux network namespaces on a private bridge, for multi-host tests.

:class:`Network` makes one namespace per host, each joined to a bridge in the root namespace by a
veth pair and given its own address on a private /24 under 10.213.0.0/16 (the root namespace gets
``.1``). Traffic stays on those addresses. The hosts share the file system (namespaces split the
network only), as the nodes of an HPC cluster share a parallel file system.

:class:`DaskCluster` runs ``dask scheduler`` on one host and ``dask worker`` processes on others,
with the repository under test first on ``PYTHONPATH``, and can SIGKILL every process of a host to
simulate a lost node.

Everything made here is named ``nicns<pid>x<k>...`` after the process that made it, so
:meth:`Network.close` removes exactly what it made (processes, namespaces, links) and
:func:`sweep_stale` removes what a killed test run left behind. Every wait has a deadline.
Needs root and iproute2; :class:`NetnsUnavailable` says why when namespaces cannot be made.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SUBNET_PREFIX = "10.213"
LOCK_FILE = "/tmp/nic-netns.lock"
_counter = itertools.count()


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, no permission)."""


def _ip(*args: str, netns: str | None = None, check: bool = True, timeout: float = 30) -> str:
    """Run ``ip ARGS`` (inside ``netns`` when given); return stdout, raise with stderr on failure."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
    return done.stdout


def polling(timeout: float, interval: float = 0.2):
    """Yield until ``timeout`` seconds have passed, sleeping ``interval`` between rounds: the one
    bounded wait loop of these tests."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        yield
        time.sleep(interval)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def repo_env(repo: Path, extra: dict | None = None) -> dict:
    """This process's environment with ``repo`` first on ``PYTHONPATH``, so it is the code imported."""
    path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **(extra or {})}


def check_available() -> None:
    """Raise :class:`NetnsUnavailable` with the reason when this machine cannot make namespaces."""
    if not sys.platform.startswith("linux"):
        raise NetnsUnavailable(f"network namespaces need Linux, not {sys.platform}")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (run the cluster tests as root)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2's `ip` command is not installed")


def namespace_pids(netns: str) -> list[int]:
    """Process ids of everything running in ``netns``."""
    out = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def kill_namespace(netns: str, timeout: float = 20) -> None:
    """SIGKILL every process in ``netns`` until none is left (a nanny may respawn between rounds)."""
    for _ in polling(timeout, 0.1):
        pids = namespace_pids(netns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    raise RuntimeError(f"processes still running in {netns} after {timeout} s: {namespace_pids(netns)}")


def _owned_names() -> tuple[list[str], list[str]]:
    """Namespaces and root-namespace links whose names follow this module's pattern."""
    spaces = [line.split()[0] for line in _ip("netns", "list", check=False).splitlines() if line.strip()]
    links = re.findall(r"^\d+: ([^:@\s]+)", _ip("-o", "link", "show", check=False), flags=re.M)
    return [n for n in spaces if n.startswith("nicns")], [n for n in links if re.match(r"^n[bv]\d+x", n)]


def sweep_stale() -> None:
    """Remove namespaces and links left by test runs whose process no longer exists."""
    spaces, links = _owned_names()
    for name in spaces:
        match = re.match(r"^nicns(\d+)x", name)
        if match and not _pid_alive(int(match.group(1))):
            kill_namespace(name)
            _ip("netns", "del", name, check=False)
    for name in links:
        match = re.match(r"^n[bv](\d+)x", name)
        if match and not _pid_alive(int(match.group(1))):
            _ip("link", "del", name, check=False)


class _SubnetLock:
    """An exclusive lock (with a deadline) around choosing a free /24 and claiming it."""

    def __init__(self, timeout: float = 30):
        self.timeout = timeout
        self.handle = None

    def __enter__(self):
        self.handle = open(LOCK_FILE, "a")
        for _ in polling(self.timeout, 0.1):
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                pass
        self.handle.close()
        raise TimeoutError(f"{LOCK_FILE} held for more than {self.timeout} s")

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _free_subnet() -> int:
    """A third octet N such that no root-namespace address or route lies in 10.213.N.0/24."""
    shown = _ip("-o", "-4", "addr", "show") + _ip("-4", "route", "show", "table", "all")
    used = {int(m) for m in re.findall(rf"\b{re.escape(SUBNET_PREFIX)}\.(\d+)\.", shown)}
    for octet in range(1, 255):
        if octet not in used:
            return octet
    raise NetnsUnavailable(f"no free /24 left under {SUBNET_PREFIX}.0.0/16")


class Network:
    """Hosts in their own network namespaces on one private bridge; use as a context manager."""

    def __init__(self, hosts: list[str]):
        check_available()
        self.tag = f"{os.getpid()}x{next(_counter)}"
        self.bridge = f"nb{self.tag}"
        self.hosts = list(hosts)
        self.netns = {host: f"nicns{self.tag}-{host}"[:40] for host in hosts}
        self.ips: dict[str, str] = {}
        self.gateway = ""
        self._made_netns: list[str] = []
        self._made_links: list[str] = []

    def __enter__(self) -> "Network":
        try:
            self._build()
        except NetnsUnavailable:
            self.close()
            raise
        except (subprocess.SubprocessError, OSError) as err:
            self.close()
            detail = getattr(err, "stderr", "") or str(err)
            raise NetnsUnavailable(f"cannot make network namespaces here: {detail.strip()}") from err
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        sweep_stale()
        with _SubnetLock():
            octet = _free_subnet()
            self.gateway = f"{SUBNET_PREFIX}.{octet}.1"
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made_links.append(self.bridge)
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)  # claims the subnet
        _ip("link", "set", self.bridge, "up")
        for index, host in enumerate(self.hosts):
            self._add_host(host, index, octet)

    def _add_host(self, host: str, index: int, octet: int) -> None:
        netns, end = self.netns[host], f"nv{self.tag}h{index}"
        _ip("netns", "add", netns)
        self._made_netns.append(netns)
        _ip("link", "set", "lo", "up", netns=netns)
        _ip("link", "add", end, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self._made_links.append(end)
        _ip("link", "set", end, "master", self.bridge)
        _ip("link", "set", end, "up")
        ip = f"{SUBNET_PREFIX}.{octet}.{10 + index}"
        _ip("addr", "add", f"{ip}/24", "dev", "eth0", netns=netns)
        _ip("link", "set", "eth0", "up", netns=netns)
        self.ips[host] = ip

    def popen(self, host: str, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace, output to ``log``, in its own session."""
        with open(log, "ab") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.netns[host], *argv], env=env,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def on_host(self, address: str | None, host: str) -> bool:
        """Whether a ``tcp://IP:PORT`` address (a worker's) is on ``host``."""
        return bool(address) and f"//{self.ips[host]}:" in address

    def kill_host(self, host: str) -> None:
        """SIGKILL every process running in ``host``'s namespace: the node is lost."""
        kill_namespace(self.netns[host])

    def close(self) -> None:
        """Kill every process in the namespaces, then delete the namespaces and the links; each
        step is tried even when an earlier one failed, and the failures are raised at the end."""
        errors: list[str] = []
        for netns in reversed(self._made_netns):
            _attempt(errors, kill_namespace, netns)
            _attempt(errors, _ip, "netns", "del", netns, check=False)
        for link in reversed(self._made_links):
            _attempt(errors, _ip, "link", "del", link, check=False)  # veth ends went with their namespace
        self._made_netns.clear()
        self._made_links.clear()
        if errors:
            raise RuntimeError("cleaning up the test network: " + "; ".join(errors))


def _attempt(errors: list[str], step, *args, **kwargs) -> None:
    """Run one cleanup step; note its failure in ``errors`` instead of stopping the cleanup."""
    try:
        step(*args, **kwargs)
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        errors.append(f"{getattr(step, '__name__', step)}{args}: {err}")


def wait_for_port(ip: str, port: int, timeout: float, alive=lambda: True) -> None:
    """Wait until a TCP connect to ``ip:port`` succeeds, or raise after ``timeout`` seconds."""
    for _ in polling(timeout, 0.2):
        if not alive():
            raise RuntimeError(f"the process that should listen on {ip}:{port} exited")
        try:
            with socket.create_connection((ip, port), timeout=1):
                return
        except OSError:
            pass
    raise TimeoutError(f"nothing listening on {ip}:{port} after {timeout} s")


def task_table(dask_scheduler) -> list[tuple[str, str, str | None, list[str]]]:
    """Run on the scheduler: (key's task kind, state, worker processing it, workers holding it)
    for every task; the kind is a tuple key's first item or a string key as it is."""
    rows = []
    for key, ts in dask_scheduler.tasks.items():
        kind = key[0] if isinstance(key, tuple) else str(key)
        worker = ts.processing_on.address if ts.processing_on else None
        rows.append((kind, ts.state, worker, [w.address for w in ts.who_has or ()]))
    return rows


def client_ids(dask_scheduler) -> list[str]:
    """Run on the scheduler: the ids of the clients connected to it."""
    return [str(name) for name in dask_scheduler.clients if not str(name).startswith("fire-and-forget")]


class DaskCluster:
    """``dask scheduler`` and ``dask worker`` processes on the hosts of a :class:`Network`.

    Workers run ``--nworkers 1 --nthreads 1`` each, as on an HPC node with one job slot, with
    ``python_bin`` (the venv's bin folder) for ``dask`` and ``repo`` first on ``PYTHONPATH``.
    """

    def __init__(self, network: Network, scheduler_host: str, workdir: Path, repo: Path, python_bin: Path):
        self.network = network
        self.scheduler_host = scheduler_host
        self.workdir = Path(workdir)
        self.repo = Path(repo)
        self.dask = str(Path(python_bin) / "dask")
        self.port = 0
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self._ports = itertools.count(8786)

    @property
    def address(self) -> str:
        return f"tcp://{self.network.ips[self.scheduler_host]}:{self.port}"

    def env(self, extra: dict | None = None) -> dict:
        """The environment of every process: the repository under test importable."""
        return repo_env(self.repo, extra)

    def _start(self, host: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{len(self.procs):02d}-{host}.log"
        proc = self.network.popen(host, argv, self.env(env), log)
        self.procs.append((host, proc, log))
        return proc

    def start_scheduler(self, timeout: float = 60) -> str:
        """Start a scheduler (on a port not used before by this cluster) and wait until it listens."""
        self.port = next(self._ports)
        ip = self.network.ips[self.scheduler_host]
        proc = self._start(self.scheduler_host, [self.dask, "scheduler", "--host", ip, "--port", str(self.port),
                                                 "--no-dashboard", "--dashboard-address", f"{ip}:0"])
        wait_for_port(ip, self.port, timeout, alive=lambda: proc.poll() is None)
        return self.address

    def start_worker(self, host: str, env: dict | None = None) -> subprocess.Popen:
        """Start one single-threaded worker process (under a nanny) on ``host``."""
        scratch = self.workdir / "scratch" / host
        scratch.mkdir(parents=True, exist_ok=True)
        return self._start(host, [self.dask, "worker", self.address, "--host", self.network.ips[host],
                                  "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                                  "--local-directory", str(scratch), "--death-timeout", "60"], env)

    def client(self, timeout: float = 30):
        """A ``distributed.Client`` on this cluster, from the root namespace."""
        from distributed import Client

        return Client(self.address, timeout=f"{timeout}s")

    def wait_workers(self, n: int, timeout: float = 120) -> list[str]:
        """Wait until ``n`` workers have joined; their addresses."""
        with self.client() as client:
            client.wait_for_workers(n, timeout=timeout)
            return sorted(client.scheduler_info(n_workers=-1)["workers"])

    def stop(self) -> None:
        """Kill every scheduler and worker process on every host, and reap them."""
        for host in self.network.hosts:
            self.network.kill_host(host)
        for _, proc, _ in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def logs(self, lines: int = 40) -> str:
        """The last lines of every process's log, for failure messages."""
        parts = []
        for host, proc, log in self.procs:
            text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            parts.append(f"--- {log.name} ({host}, rc={proc.poll()}) ---\n" + "\n".join(text))
        return "\n".join(parts)
