"""Pipeline progress as Prometheus metrics on the scheduler's ``/metrics`` page.

The compression client publishes its progress as Dask events (:func:`publish_progress`); a
scheduler plugin (:class:`ProgressMetrics`) turns them into Prometheus gauges and counters in the
scheduler's process, where the dashboard's ``/metrics`` endpoint serves them next to Dask's own:

``nic_slides_done{run}``, ``nic_slides_total{run}``, ``nic_run_progress{run}`` (0..1),
``nic_patches_encoded_total{run}`` (a counter: ``rate()`` it in Prometheus) and
``nic_patches_per_second{run}`` (the rate over the last ``RATE_WINDOW_S`` seconds of reports, so a
report that adds no patches, such as a slide finishing just after its last block, does not drop it
to 0). ``run`` is the store's name (``cohort.zarr``), what a dashboard user knows the run by.

The plugin is registered by the first :func:`publish_progress` of a client, or at scheduler start
with ``dask scheduler --preload nic_pipeline.runtime.monitor``.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from pathlib import PurePath

from distributed.diagnostics.plugin import SchedulerPlugin
from prometheus_client import Counter, Gauge

TOPIC = "nic-progress"
RATE_WINDOW_S = 30.0  # nic_patches_per_second: patches over (about) the last 30 s of reports
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
        self.reports: dict[str, deque] = {}  # run -> (time, patches) of its recent reports

    def log_event(self, topic, msg) -> None:
        """Update the run's metrics from one progress event; other events pass by."""
        if topic != TOPIC or not isinstance(msg, dict):
            return
        run = str(msg["run"])
        done, total, patches, now = int(msg["slides_done"]), int(msg["slides_total"]), int(msg["patches"]), msg["time"]
        SLIDES_DONE.labels(run).set(done)
        SLIDES_TOTAL.labels(run).set(total)
        RUN_PROGRESS.labels(run).set(done / total if total else 1.0)
        reports = self.reports.setdefault(run, deque())
        last_patches = reports[-1][1] if reports else 0
        if patches > last_patches:
            PATCHES.labels(run).inc(patches - last_patches)
        reports.append((now, max(patches, last_patches)))
        while len(reports) > 2 and now - reports[1][0] >= RATE_WINDOW_S:  # keep one report older than the window
            reports.popleft()
        first_time, first_patches = reports[0]
        if now > first_time:
            PATCH_RATE.labels(run).set((reports[-1][1] - first_patches) / (now - first_time))


def register_metrics(client) -> None:
    """Install :class:`ProgressMetrics` on the client's scheduler (once per client)."""
    if client in _registered:
        return
    _registered.add(client)
    try:
        client.register_plugin(ProgressMetrics(), name=ProgressMetrics.name)
    except Exception as err:  # noqa: BLE001 - monitoring must never stop a run
        logger.warning("no Prometheus progress metrics: the scheduler cannot load %s (%s)", __name__, err)


def run_label(run) -> str:
    """The ``run`` label of a run: the store's name for a store path (``/data/cohort.zarr`` ->
    ``cohort.zarr``), else the text given."""
    text = str(run).rstrip("/\\")
    return PurePath(text).name or text


def publish_progress(client, run, slides_done: int, slides_total: int, patches_done: int) -> None:
    """Report a run's progress to the scheduler's metrics: call it from the client loop whenever a
    slide or block finishes. ``run`` is the store path (labelled by its name, :func:`run_label`) or
    a name; ``patches_done`` is cumulative for the run. Cheap: one batched message."""
    register_metrics(client)
    client.log_event(TOPIC, {"run": run_label(run), "slides_done": slides_done, "slides_total": slides_total,
                             "patches": patches_done, "time": time.time()})


def dask_setup(scheduler) -> None:
    """``dask scheduler --preload nic_pipeline.runtime.monitor``: the metrics from the start."""
    scheduler.add_plugin(ProgressMetrics(), name=ProgressMetrics.name)
