"""`nic compress` on a multi-host Dask cluster: a scheduler and two worker nodes, each in its own
network namespace with its own address, on a shared file system.

The jobs run from the root namespace as a user's login node would, through the CLI only, so the
tests hold whatever the task graph and store layout look like inside.
"""

from __future__ import annotations

import time

import pytest

from tests.cluster.jobs import (
    assert_same_arrays,
    assert_same_slides,
    blocks_encoded,
    compress_args,
    finish,
    nic,
    readable,
    slide_arrays,
    slide_statuses,
    start_nic,
)
from tests.cluster.netns import client_ids, polling, task_table

NODES = ("node1", "node2")
ENCODE = "encode-block"


def start_nodes(cluster) -> None:
    """One single-threaded worker on each node, all joined."""
    for host in NODES:
        cluster.start_worker(host)
    cluster.wait_workers(len(NODES))


def assert_complete(store, output: str) -> None:
    statuses = slide_statuses(store)
    assert len(statuses) == 3 and set(statuses.values()) == {"complete"}, f"{statuses}\n{readable(output)}"


def kill_node_mid_run(cluster, host: str, job, timeout: float = 150) -> dict:
    """Once some encode-block tasks have finished and ``host`` is running one, SIGKILL every
    process of ``host``; what the scheduler showed at that moment."""
    with cluster.client() as client:
        for _ in polling(timeout, 0.1):
            assert job.poll() is None, "the job ended before the node could be killed: make it longer"
            encode = [row for row in client.run_on_scheduler(task_table) if row[0].startswith(ENCODE)]
            done = sum(state == "memory" for _, state, _, _ in encode)
            busy = sum(cluster.network.on_host(worker, host) for _, _, worker, _ in encode)
            if done >= 2 and busy and done < len(encode):
                cluster.network.kill_host(host)
                return {"done": done, "busy_on_lost_node": busy, "tasks": len(encode)}
    raise AssertionError(f"no moment to kill {host} within {timeout} s")


def wait_gone(cluster, host: str, timeout: float = 60) -> list[str]:
    """Wait until the scheduler has dropped every worker of ``host``; the workers left."""
    workers = []
    with cluster.client() as client:
        for _ in polling(timeout, 0.1):
            workers = list(client.scheduler_info(n_workers=-1)["workers"])
            if not any(cluster.network.on_host(w, host) for w in workers):
                return workers
    raise AssertionError(f"the scheduler still lists {host}'s workers after {timeout} s: {workers}")


def wait_job_connected(cluster, job, timeout: float = 90) -> None:
    """Wait until the background job's client has connected to the scheduler."""
    with cluster.client() as client:
        for _ in polling(timeout, 0.1):
            assert job.poll() is None, "the job ended before any worker joined"
            if set(client.run_on_scheduler(client_ids)) - {client.id}:
                return
    raise AssertionError(f"the job did not connect within {timeout} s")


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_node_lost_mid_run_job_finishes_with_clean_output(dask_cluster, cohort, clean_runs, tmp_path):
    cluster = dask_cluster
    cluster.start_scheduler()
    start_nodes(cluster)
    reference = clean_runs.store("nic", cluster.address)
    store, log = tmp_path / "node-loss.zarr", tmp_path / "node-loss.log"
    job = start_nic(*compress_args(cohort, store, cluster.address), log=log)
    try:
        moment = kill_node_mid_run(cluster, "node1", job)
        left = wait_gone(cluster, "node1")
        code, output = finish(job, log)
    finally:
        if job.poll() is None:
            job.kill()
    assert moment["busy_on_lost_node"] and moment["done"] < moment["tasks"], moment
    assert left and all(cluster.network.on_host(w, "node2") for w in left), left
    assert code == 0, readable(output)
    assert_complete(store, output)
    assert_same_slides(store, reference)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_two_jobs_with_different_encoders_share_a_cluster(dask_cluster, cohort, clean_runs, tmp_path):
    cluster = dask_cluster
    cluster.start_scheduler()
    start_nodes(cluster)
    encoders = ("nic", "nic-mtl4-tellez2020")
    references = {encoder: clean_runs.store(encoder, cluster.address) for encoder in encoders}
    jobs = {}
    for encoder in encoders:
        store, log = tmp_path / f"{encoder}.zarr", tmp_path / f"{encoder}.log"
        jobs[encoder] = (store, log, start_nic(*compress_args(cohort, store, cluster.address, encoder), log=log))
    results = {encoder: finish(proc, log, timeout=180) for encoder, (_, log, proc) in jobs.items()}
    for encoder, (store, _, _) in jobs.items():
        code, output = results[encoder]
        assert code == 0, f"{encoder}:\n{readable(output)}"
        assert_complete(store, output)
        assert_same_slides(store, references[encoder])


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_workers_join_late_then_rerun_on_fresh_cluster_redoes_nothing(dask_cluster, cohort, tmp_path):
    cluster = dask_cluster
    cluster.start_scheduler()
    store, log = tmp_path / "late.zarr", tmp_path / "late.log"
    job = start_nic(*compress_args(cohort, store, cluster.address, wait_workers=len(NODES)), log=log)
    try:
        wait_job_connected(cluster, job)
        time.sleep(3)  # the job has settled its run with no worker in the cluster
        start_nodes(cluster)
        code, output = finish(job, log)
    finally:
        if job.poll() is None:
            job.kill()
    assert code == 0, readable(output)
    assert blocks_encoded(output) > 0, readable(output)
    assert_complete(store, output)
    written = slide_arrays(store)

    cluster.stop()  # a fresh cluster: new scheduler, new workers
    cluster.start_scheduler()
    start_nodes(cluster)
    rerun = nic(*compress_args(cohort, store, cluster.address, wait_workers=len(NODES)))
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, readable(output)
    assert blocks_encoded(rerun.stdout) == 0, readable(output)
    assert_complete(store, output)
    assert_same_arrays(slide_arrays(store), written)
