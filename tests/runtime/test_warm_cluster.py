"""`nic cluster start/status/stop`: a warm cluster that later commands use, with real processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import Client

from nic_models.registry import DEFAULT_ENCODER
from nic_pipeline.runtime import warm
from nic_pipeline.synth import write_synthetic_slide

NIC = [sys.executable, "-m", "nic_pipeline"]


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by whoever adopted it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids, seconds: float = 20) -> list[int]:
    ends = time.monotonic() + seconds
    while (left := [pid for pid in pids if running(pid)]) and time.monotonic() < ends:
        time.sleep(0.2)
    return left


@pytest.fixture
def cluster_env(tmp_path):
    """An environment whose warm-cluster file is this test's own; on the way out, whatever
    cluster the test started is killed (its daemon leads a process group holding its workers)."""
    path = tmp_path / "warm" / "cluster.json"
    env = {**os.environ, warm.CLUSTER_FILE_ENV: str(path), "PYTHONWARNINGS": "ignore"}
    started: list[int] = []
    yield env, path, started
    record = warm.read_record(path)
    pids = started + ([record["nic"]["pid"]] if record else [])
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "small.tif"
    write_synthetic_slide(path, 2048, 2048, mpp=0.5, seed=5)
    return path


def nic(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*NIC, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False, cwd=Path(env[warm.CLUSTER_FILE_ENV]).parent.parent)


def start(env, started, workers=2):
    done = nic(env, "cluster", "start", "--workers", workers)
    assert done.returncode == 0, done.stdout + done.stderr
    record = warm.read_record(Path(env[warm.CLUSTER_FILE_ENV]))
    started.append(record["nic"]["pid"])
    return done, record


def worker_state(path):
    """{worker address: (pid, encoder loads)} on the warm cluster."""
    def state(dask_worker=None):
        plugin = dask_worker.plugins.get("nic-worker")
        return os.getpid(), len(plugin.loads) if plugin is not None else 0

    with Client(scheduler_file=str(path), timeout=10) as client:
        return client.run(state)


@pytest.mark.slow
def test_start_status_two_compressions_on_the_same_workers_then_stop(cluster_env, small_slide, tmp_path):
    env, path, started = cluster_env
    done, record = start(env, started)
    assert record["address"] in done.stdout and "dashboard: http://127.0.0.1:" in done.stdout
    assert record["type"] == "Scheduler" and record["n_workers"] == 2  # Dask's own scheduler file
    before = worker_state(path)
    assert len(before) == 2 and all(loads == 0 for _, loads in before.values())

    again = nic(env, "cluster", "start")
    assert again.returncode == 2 and "already running" in again.stderr and len(again.stderr.splitlines()) == 1

    status = nic(env, "cluster", "status")
    assert status.returncode == 0 and record["address"] in status.stdout
    assert status.stdout.count("encoders loaded: none") == 2

    first = nic(env, "compress", small_slide, "--out", tmp_path / "a.zarr")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"cluster: using the warm cluster at {record['address']}" in first.stderr
    after_first = worker_state(path)
    assert {pid for pid, _ in after_first.values()} == {pid for pid, _ in before.values()}

    second = nic(env, "compress", small_slide, "--out", tmp_path / "b.zarr")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"cluster: using the warm cluster at {record['address']}" in second.stderr
    after_second = worker_state(path)
    assert after_second == after_first  # the same processes, and no encoder loaded again
    assert all(loads == 1 for _, loads in after_second.values())
    status = json.loads(nic(env, "cluster", "status", "--json").stdout)
    assert [w["encoders"][0].split(" (")[0] for w in status["workers"].values()] == [DEFAULT_ENCODER] * 2

    stopped = nic(env, "cluster", "stop")
    assert stopped.returncode == 0 and f"stopped {record['address']}" in stopped.stdout
    assert not path.exists()
    assert wait_gone([record["nic"]["pid"], *(pid for pid, _ in before.values())]) == []
    assert nic(env, "cluster", "status").returncode == 1


@pytest.mark.slow
def test_a_crashed_warm_cluster_is_reported_and_the_command_runs_embedded(cluster_env, small_slide, tmp_path):
    env, path, started = cluster_env
    _, record = start(env, started, workers=1)
    os.killpg(record["nic"]["pid"], signal.SIGKILL)  # the daemon and its worker, as a crash or the OOM killer
    assert wait_gone([record["nic"]["pid"]]) == []
    assert path.exists()
    done = nic(env, "compress", small_slide, "--out", tmp_path / "c.zarr", "--workers", 1)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("cluster:")]
    assert lines == [(f"cluster: the warm cluster at {record['address']} is gone (stale {path} removed); "
                      "starting an embedded one")]
    assert not path.exists()
    assert "no warm cluster was running" in nic(env, "cluster", "stop").stdout


def _listening():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def test_default_file_is_per_user_and_per_host(monkeypatch, tmp_path):
    monkeypatch.delenv(warm.CLUSTER_FILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert warm.cluster_file() == tmp_path / "nic" / f"cluster-{socket.gethostname()}.json"
    monkeypatch.setenv(warm.CLUSTER_FILE_ENV, str(tmp_path / "mine.json"))
    assert warm.cluster_file() == tmp_path / "mine.json"


def test_no_file_means_the_embedded_cluster_without_a_word(monkeypatch, tmp_path):
    monkeypatch.setenv(warm.CLUSTER_FILE_ENV, str(tmp_path / "none.json"))
    said = []
    assert warm.warm_client(say=said.append) is None and said == []


def test_a_cluster_started_with_other_nic_settings_is_not_used(monkeypatch, tmp_path):
    path = tmp_path / "cluster.json"
    monkeypatch.setenv(warm.CLUSTER_FILE_ENV, str(path))
    monkeypatch.delenv("NIC_CPU_BF16", raising=False)
    with contextlib.closing(_listening()) as server:
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        theirs = warm.fingerprint()
        theirs["env"] = {**theirs["env"], "NIC_CPU_BF16": "0"}
        path.write_text(json.dumps({"type": "Scheduler", "address": address, "nic": {"fingerprint": theirs}}))
        said = []
        assert warm.warm_client(say=said.append) is None
    assert said == [(f"cluster: the warm cluster at {address} was started with another environment (NIC_CPU_BF16); "
                     "starting an embedded one")]
    assert path.exists()  # it still runs: not ours to remove


def test_a_file_whose_scheduler_is_gone_is_removed_with_one_line(monkeypatch, tmp_path):
    path = tmp_path / "cluster.json"
    monkeypatch.setenv(warm.CLUSTER_FILE_ENV, str(path))
    with contextlib.closing(_listening()) as server:
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    path.write_text(json.dumps({"type": "Scheduler", "address": address}))  # a file as `dask scheduler` writes
    said = []
    assert warm.warm_client(say=said.append) is None
    assert len(said) == 1 and "is gone" in said[0] and not path.exists()
