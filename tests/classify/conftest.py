"""Fixtures shared by the slide-level tests: a generated cohort and a 2-worker process cluster."""

from __future__ import annotations

import pytest
from distributed import Client, LocalCluster

from tests.classify.cohort import make_cohort


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="session")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        yield client
