"""Fixtures for the multi-host tests: a private network of namespaced hosts and a Dask cluster on it.

Each test gets three hosts (``sched``, ``node1``, ``node2``) in their own network namespaces; the
test's client commands run in the root namespace and reach them over the bridge. Teardown kills
every process and removes every namespace and link, whether the test passed or failed, and prints
the scheduler's and workers' logs when it failed. Where namespaces cannot be made the tests skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.cluster.jobs import CleanRuns, nic, readable
from tests.cluster.netns import DaskCluster, NetnsUnavailable, Network
from tests.conftest import REPO

HOSTS = ["sched", "node1", "node2"]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so teardown knows whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def netns_network():
    """Three namespaced hosts on a private bridge; skips where namespaces cannot be made."""
    try:
        network = Network(HOSTS).__enter__()
    except NetnsUnavailable as err:
        pytest.skip(str(err))
    try:
        yield network
    finally:
        network.close()


@pytest.fixture
def dask_cluster(netns_network, tmp_path, request):
    """A Dask cluster on the namespaced hosts, not yet started: the test starts the scheduler and
    workers it needs. Everything it started is killed at teardown."""
    cluster = DaskCluster(netns_network, "sched", tmp_path / "cluster", REPO, Path(sys.executable).parent)
    try:
        yield cluster
    finally:
        cluster.stop()
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            print(cluster.logs())


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Three small synthetic slides, made once through the CLI as a user would."""
    out = tmp_path_factory.mktemp("cohort") / "slides"
    done = nic("synth", str(out), "--slides", "3", "--width", "3072", "--height", "3072", "--seed", "7",
               env=None, timeout=300)
    assert done.returncode == 0, readable(done.stdout + done.stderr)
    return out


@pytest.fixture(scope="session")
def clean_runs(tmp_path_factory, cohort) -> CleanRuns:
    """Stores of clean single-job runs of the cohort, by encoder, made by the first test that needs one."""
    return CleanRuns(tmp_path_factory.mktemp("clean"), cohort)
