"""TLS on a real scheduler and worker (``dask scheduler`` / ``dask worker`` processes): a client
without the certificate is refused, one with it computes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from distributed.security import Security

from nic_pipeline.errors import NicError
from nic_pipeline.runtime.cluster import connect, tls_security
from tests.deploy.conftest import job_environment


def _write_certificates(folder):
    """One temporary key and self-signed certificate, as PEM files (what the sbatch scripts make)."""
    temporary = Security.temporary()
    paths = {}
    for name, text in (("ca", temporary.tls_ca_file), ("cert", temporary.tls_client_cert),
                       ("key", temporary.tls_client_key)):
        paths[name] = folder / f"{name}.pem"
        paths[name].write_text(text)
        paths[name].chmod(0o600)
    return paths


@pytest.fixture
def tls_cluster(tmp_path):
    """A TLS scheduler and one worker in their own processes; yields (address, certificate paths)."""
    pem = _write_certificates(tmp_path)
    tls = ["--tls-ca-file", str(pem["ca"]), "--tls-cert", str(pem["cert"]), "--tls-key", str(pem["key"])]
    scheduler_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file",
                               str(scheduler_file), "--host", "127.0.0.1", "--port", "0", "--no-dashboard", *tls])]
    try:
        for _ in range(120):
            if scheduler_file.exists() and scheduler_file.stat().st_size:
                break
            time.sleep(0.5)
        address = json.loads(scheduler_file.read_text())["address"]
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads",
                                       "1", "--no-dashboard", "--host", "127.0.0.1", *tls]))
        yield address, pem
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_tls_scheduler_refuses_clients_without_the_certificate(tls_cluster, cohort, tmp_path):
    address, pem = tls_cluster
    assert address.startswith("tls://")
    # refused clients run in their own processes, as users' would
    for target in (address, address.replace("tls://", "tcp://")):
        refused = subprocess.run([sys.executable, "-m", "nic_pipeline", "compress", str(cohort), "--out",
                                  str(tmp_path / "x.zarr"), "--scheduler", target],
                                 env=job_environment(DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="10s"),
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "cannot reach the Dask scheduler" in refused.stderr, refused.stderr
    with connect(scheduler=address, security=tls_security(str(pem["ca"]), str(pem["cert"]), str(pem["key"]))) as client:
        client.wait_for_workers(1, timeout=120)
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6


def test_tls_flags_come_in_threes(tmp_path):
    with pytest.raises(NicError, match="all of"):
        tls_security(str(tmp_path / "ca.pem"), None, None)


def test_embedded_dashboard_listens_on_localhost_only():
    with connect(workers=1) as client:
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        http = client.scheduler_info()["services"]["dashboard"]
        server = client.cluster.scheduler.http_server
        hosts = {sock.getsockname()[0] for sock in server._sockets.values()}
        assert hosts == {"127.0.0.1"}, (hosts, http)
