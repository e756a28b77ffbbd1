"""Progress published by a client shows on the scheduler's Prometheus ``/metrics`` page."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nic_pipeline.runtime.cluster import connect
from nic_pipeline.runtime.monitor import PATCH_RATE, TOPIC, ProgressMetrics, publish_progress, run_label


def _metrics(url: str, run: str) -> dict[str, float]:
    """The nic_* samples of one run on a /metrics page (real HTTP GET)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("nic_") and sample.labels.get("run") == run}



def _wait_for_slides(url: str, run: str, slides_done: int, seconds: float = 20) -> dict:
    """The run's metrics once the scheduler's page shows ``slides_done`` (or after ``seconds``)."""
    deadline = time.monotonic() + seconds
    metrics = _metrics(url, run)
    while metrics.get("nic_slides_done") != slides_done and time.monotonic() < deadline:
        time.sleep(0.2)
        metrics = _metrics(url, run)
    return metrics

@pytest.mark.slow
def test_published_progress_is_on_the_scheduler_metrics_page():
    with connect(workers=1, dashboard=False) as client:
        url = client.dashboard_link.replace("/status", "/metrics")
        publish_progress(client, "run-a", slides_done=1, slides_total=4, patches_done=100)
        time.sleep(1.0)
        publish_progress(client, "run-a", slides_done=3, slides_total=4, patches_done=400)
        metrics = _wait_for_slides(url, "run-a", 3)
    assert metrics["nic_slides_done"] == 3 and metrics["nic_slides_total"] == 4
    assert metrics["nic_run_progress"] == 0.75
    assert metrics["nic_patches_encoded_total"] == 400
    assert 100 < metrics["nic_patches_per_second"] <= 300  # 300 patches in a little over one second


@pytest.mark.slow
def test_the_run_is_labelled_by_its_store_and_a_finishing_slide_keeps_the_patch_rate(tmp_path):
    """As the compression client reports: blocks add patches, then the slide's finish adds none."""
    store = tmp_path / "cohort-b.zarr"
    with connect(workers=1, dashboard=False) as client:
        url = client.dashboard_link.replace("/status", "/metrics")
        publish_progress(client, store, slides_done=0, slides_total=2, patches_done=0)
        time.sleep(1.0)
        publish_progress(client, store, slides_done=0, slides_total=2, patches_done=500)  # a block
        publish_progress(client, store, slides_done=1, slides_total=2, patches_done=500)  # its slide finishes
        metrics = _wait_for_slides(url, "cohort-b.zarr", 1)
    assert metrics["nic_slides_done"] == 1 and metrics["nic_patches_encoded_total"] == 500
    assert 200 < metrics["nic_patches_per_second"] <= 500  # not 0.0: 500 patches in a little over a second


def test_the_rate_covers_a_window_of_reports():
    plugin, run = ProgressMetrics(), "window-run"
    for t, patches in ((0.0, 0), (10.0, 1000), (10.5, 1000), (40.0, 4000), (45.0, 4000)):
        plugin.log_event(TOPIC, {"run": run, "slides_done": 0, "slides_total": 1, "patches": patches, "time": t})
    assert PATCH_RATE.labels(run)._value.get() == pytest.approx((4000 - 1000) / (45.0 - 10.5))
    assert run_label("/data/x/cohort.zarr/") == "cohort.zarr" and run_label("run-a") == "run-a"
