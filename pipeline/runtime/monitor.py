"""Pipeline progress as Prometheus metrics on the scheduler's ``/metrics`` page.

The compression client publishes its progress as Dask events (:func:`publish_progress`); a
scheduler plugin (:class:`ProgressMetrics`) turns them into Prometheus gauges and counters in the
scheduler's process, where the dashboard's ``/metrics`` endpoint serves them next to Dask's own:

``nic_slides_done{run}``, ``nic_slides_total{run}``, ``nic_run_progress{run}`` (0..1),
``nic_patches_encoded_total{run}`` (a counter: ``rate()`` it in Prometheus) and
``nic_patches_per_second{run}`` (the rate between the last two reports).

The plugin is registered by the first :func:`publish_progress` of a client, or at scheduler start
with ``dask scheduler --preload nic_pipeline.runtime.monitor``.
"""

from __future__ import annotations

import logging
import time
import weakref

from distributed.diagnostics.plugin import SchedulerPlugin
from prometheus_client import Counter, Gauge

TOPIC = "nic-progress"
logger = logging.getLogger(__name__)

# One set per process: prometheus_client's registry refuses a metric registered twice.
SLIDES_DONE = Gauge("nic_slides_done", "Slides finished (complete, skipped or failed) in a NIC run", ["run"])
SLIDES_TOTAL = Gauge("nic_slides_total", "Slides in a NIC run", ["run"])
RUN_PROGRESS = Gauge("nic_run_progress", "Share of a NIC run's slides finished, 0..1", ["run"])
PATCHES = Counter("nic_patches_encoded", "Patches encoded by a NIC run", ["run"])
PATCH_RATE = Gauge("nic_patches_per_second", "Patches encoded per second between the last two reports", ["run"])

_registered: weakref.WeakSet = weakref.WeakSet()


class ProgressMetrics(SchedulerPlugin):
    """Scheduler plugin: the ``nic-progress`` events of clients as Prometheus metrics."""

    name = "nic-progress-metrics"

    def __init__(self):
        self.last: dict[str, tuple[float, int]] = {}  # run -> (time, patches) of its last report

    def log_event(self, topic, msg) -> None:
        """Update the run's metrics from one progress event; other events pass by."""
        if topic != TOPIC or not isinstance(msg, dict):
            return
        run = str(msg["run"])
        done, total, patches, now = int(msg["slides_done"]), int(msg["slides_total"]), int(msg["patches"]), msg["time"]
        SLIDES_DONE.labels(run).set(done)
        SLIDES_TOTAL.labels(run).set(total)
        RUN_PROGRESS.labels(run).set(done / total if total else 1.0)
        last_time, last_patches = self.last.get(run, (now, 0))
        if patches > last_patches:
            PATCHES.labels(run).inc(patches - last_patches)
        if now > last_time:
            PATCH_RATE.labels(run).set(max(patches - last_patches, 0) / (now - last_time))
        self.last[run] = (now, max(patches, last_patches))


def register_metrics(client) -> None:
    """Install :class:`ProgressMetrics` on the client's scheduler (once per client)."""
    if client in _registered:
        return
    _registered.add(client)
    try:
        client.register_plugin(ProgressMetrics(), name=ProgressMetrics.name)
    except Exception as err:  # noqa: BLE001 - monitoring must never stop a run
        logger.warning("no Prometheus progress metrics: the scheduler cannot load %s (%s)", __name__, err)


def publish_progress(client, run_id: str, slides_done: int, slides_total: int, patches_done: int) -> None:
    """Report a run's progress to the scheduler's metrics: call it from the client loop whenever a
    slide or block finishes. ``patches_done`` is cumulative for the run. Cheap: one batched message."""
    register_metrics(client)
    client.log_event(TOPIC, {"run": run_id, "slides_done": slides_done, "slides_total": slides_total,
                             "patches": patches_done, "time": time.time()})


def dask_setup(scheduler) -> None:
    """``dask scheduler --preload nic_pipeline.runtime.monitor``: the metrics from the start."""
    scheduler.add_plugin(ProgressMetrics(), name=ProgressMetrics.name)
