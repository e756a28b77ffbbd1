"""Benchmark the compression graph at cohort scale: many small slides, so per-task costs show.

    python benchmarks/scale.py [--slides 1000] [--size 1024] [--workers 2] [--workdir /tmp/nic-scale]
                               [--cluster embedded|separate] [--out docs/benchmarks.md] [--no-write]
    python benchmarks/scale.py --cluster netns --hosts 8 --slides 10000 --size 512

``--cluster netns`` (root, Linux): one scheduler host and ``--hosts`` worker hosts in network
namespaces, the first pass killed half way and resumed; see ``benchmarks/scale_netns.py``.

A cohort of ``--slides`` synthetic slides of ``--size``² px (made once by a process pool, then
cached in the work folder) is compressed through :func:`nic_pipeline.api.compress` (preflight
included) into a fresh store. Measured:

* tasks per second through the scheduler: tasks / wall time, and the scheduler's own view (a
  scheduler plugin counts tasks reaching memory per kind, between the first and the last);
* CPU per task of the client's submission loop (its main thread), of the scheduler (the embedded
  cluster's event-loop thread, which the client's comms share; ``--cluster separate``: the
  ``dask scheduler`` process alone) and of this whole process; the client's peak memory;
* files per slide in the store;
* opening the store for training: consolidated metadata (one read) plus each slide's attributes
  and tissue grid, against one ``xarray.open_zarr(..., consolidated=False)`` per slide, and
  against what ``nic train`` does today (``SlideSource.meta`` + ``tissue``);
* a rerun with nothing to do, planning 10,000 slides (hard links), and consolidating the store.

Results replace the "Scale" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
from distributed.diagnostics.plugin import SchedulerPlugin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.compress import machine, replace_section  # noqa: E402
from benchmarks.scale_netns import Progress, RssSeries  # noqa: E402
from nic_pipeline.api import compress  # noqa: E402
from nic_pipeline.compress.jobs import plan_jobs  # noqa: E402
from nic_pipeline.compress.store import open_cohort  # noqa: E402
from nic_pipeline.runtime.cluster import _worker_environment, connect  # noqa: E402


# --------------------------------------------------------------------------- the cohort


def _write_one(path: str, size: int, seed: int) -> None:
    """One synthetic slide with tissue (at this size some seeds draw background only: the next
    seed is tried), written outside the cohort folder and moved in whole."""
    from nic_pipeline.compress.tissue import slide_tissue_mask
    from nic_pipeline.io import open_slide
    from nic_pipeline.synth import write_synthetic_slide

    part = Path(path).parent.parent / "partial" / Path(path).name
    for attempt in range(20):
        write_synthetic_slide(part, size, size, mpp=0.5, seed=seed + 1_000_003 * attempt, workers=1)
        with open_slide(part) as slide:
            mask, _ = slide_tissue_mask(slide, require_tissue=False)
        if mask.mean() > 0.05:
            break
    os.replace(part, path)


def make_cohort(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` synthetic slides in ``folder`` (those already there are kept), written by a process pool."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / "partial").mkdir(exist_ok=True)
    paths = [folder / f"scale_{i:05d}.tif" for i in range(n)]
    missing = [(str(p), size, i) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        start = time.perf_counter()
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_write_one, *zip(*missing), chunksize=8))
        print(f"synthesized {len(missing)} slides in {time.perf_counter() - start:.0f} s", flush=True)
    return paths


def time_planning(cohort: Path, n: int) -> float:
    """Seconds :func:`plan_jobs` takes over ``n`` slide files (hard links to the cohort's)."""
    folder = cohort.parent / f"plan-{n}"
    if not folder.exists():
        part = folder.with_suffix(".partial")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        sources = sorted(cohort.glob("*.tif"))
        for i in range(n):
            os.link(sources[i % len(sources)], part / f"plan_{i:05d}.tif")
        part.rename(folder)
    start = time.perf_counter()
    jobs = plan_jobs([folder])
    assert len(jobs) == n
    return time.perf_counter() - start


# --------------------------------------------------------------------------- what the scheduler sees


class TaskCounter(SchedulerPlugin):
    """Counts tasks reaching memory (or erring) per kind, with the times of the first and last,
    and the seconds the workers spent computing each kind."""

    name = "nic-bench-task-counter"

    def __init__(self):
        self.counts, self.busy, self.first, self.last = Counter(), Counter(), None, None

    def transition(self, key, start, finish, *args, **kwargs):
        if finish in ("memory", "erred"):
            now = time.time()
            self.first = self.first or now
            self.last = now
            kind = key[0] if isinstance(key, tuple) else str(key).split("-")[0]
            self.counts[kind] += 1
            self.busy[kind] += sum(s["stop"] - s["start"] for s in kwargs.get("startstops", ())
                                   if s.get("action") == "compute")

    def summary(self) -> dict:
        return {"counts": dict(self.counts), "busy": dict(self.busy), "seconds": (self.last or 0) - (self.first or 0)}


def _scheduler_cpu(dask_scheduler=None) -> dict:
    """CPU seconds of the scheduler's event-loop thread and of its whole process."""
    cpu = psutil.Process().cpu_times()
    return {"thread": time.thread_time(), "process": cpu.user + cpu.system, "pid": os.getpid()}


def _counter_summary(name: str, dask_scheduler=None) -> dict:
    return dask_scheduler.plugins[name].summary()


def measured_run(jobs, store: Path, client) -> dict:
    """One ``compress`` call, with its tasks and the CPU of client and scheduler around it."""
    counter = f"{TaskCounter.name}-{time.time_ns()}"  # a fresh count per run
    client.register_plugin(TaskCounter(), name=counter)
    me = psutil.Process()
    rss_before = me.memory_info().rss
    cpu0, main0, sched0 = me.cpu_times(), time.thread_time(), client.run_on_scheduler(_scheduler_cpu)
    with RssSeries(os.getpid(), Progress(), interval=0.05) as rss:
        start = time.perf_counter()
        report = compress(jobs, store, client, progress=False, wait_workers=len(client.scheduler_info()["workers"]))
        wall = time.perf_counter() - start
    cpu1, main1, sched1 = me.cpu_times(), time.thread_time(), client.run_on_scheduler(_scheduler_cpu)
    seen = client.run_on_scheduler(_counter_summary, counter)
    status = Counter(s.status for s in report.slides)
    tasks = sum(seen["counts"].values())
    return {
        "wall": wall, "slides": status, "patches": report.patches, "blocks": report.blocks_encoded,
        "tasks": tasks, "by_kind": seen["counts"], "worker_busy": seen["busy"], "scheduler_span": seen["seconds"],
        "client_main_cpu": main1 - main0,
        "process_cpu": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        "scheduler_thread_cpu": sched1["thread"] - sched0["thread"],
        "scheduler_process_cpu": sched1["process"] - sched0["process"],
        "scheduler_separate": sched0["pid"] != os.getpid(),
        "client_peak_mb": max(rss.peak_mb, rss_before / 2**20), "client_rss_before_mb": rss_before / 2**20,
        "failed": [(s.slide_id, s.error) for s in report.failed][:3],
    }


def idle_scheduler_cpu(client, seconds: float = 10.0) -> float:
    """CPU seconds per second that the scheduler spends with no task at all (heartbeats, periodic
    callbacks): the baseline to subtract from a run's scheduler CPU."""
    before = client.run_on_scheduler(_scheduler_cpu)
    time.sleep(seconds)
    after = client.run_on_scheduler(_scheduler_cpu)
    key = "process" if before["pid"] != os.getpid() else "thread"
    return (after[key] - before[key]) / seconds


def separate_cluster(workdir: Path, workers: int):
    """``dask scheduler`` and ``workers`` single-threaded ``dask worker`` processes, as on HPC nodes."""
    scheduler_file = workdir / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), **_worker_environment()}
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [subprocess.Popen([*dask, "--scheduler-file", str(scheduler_file), "--no-dashboard", "--port", "0"],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.DEVNULL)]
    while not scheduler_file.exists():
        time.sleep(0.2)
    procs += [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                str(scheduler_file), "--nthreads", "1", "--no-dashboard", "--name", f"w{i}"],
                               env=env, stderr=subprocess.DEVNULL) for i in range(workers)]
    return scheduler_file, procs


# --------------------------------------------------------------------------- the store


def files_per_slide(store: Path) -> dict:
    """Files under each slide's folder: mean and max; and files at the store's root."""
    counts = [sum(len(files) for _, _, files in os.walk(entry)) for entry in store.iterdir() if entry.is_dir()]
    root_files = sum(1 for entry in store.iterdir() if entry.is_file())
    return {"mean": sum(counts) / len(counts), "max": max(counts), "slides": len(counts), "root_files": root_files,
            "root_metadata_mb": (store / "zarr.json").stat().st_size / 2**20}


def time_opening(store: Path) -> dict:
    """Seconds to read every slide's attributes and tissue grid, three ways."""
    import numpy as np
    import xarray as xr

    from nic_pipeline.classify.source import SlideSource, list_store_slides

    start = time.perf_counter()
    root = open_cohort(store)
    ids = sorted(name for name, _ in root.groups())
    for slide_id in ids:
        group = root[slide_id]
        dict(group.attrs), np.asarray(group["tissue"][...])
    consolidated = time.perf_counter() - start

    start = time.perf_counter()
    for slide_id in ids:
        ds = xr.open_zarr(str(store), group=slide_id, consolidated=False, zarr_format=3)
        dict(ds.attrs), ds["tissue"].values
    per_slide = time.perf_counter() - start

    start = time.perf_counter()
    source = SlideSource(store)
    for slide_id in list_store_slides(store):
        source.meta(slide_id), source.tissue(slide_id)
    train_today = time.perf_counter() - start
    return {"slides": len(ids), "consolidated": consolidated, "xarray_per_slide": per_slide, "train_today": train_today}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cluster", choices=["embedded", "separate", "netns"], default="embedded")
    parser.add_argument("--hosts", type=int, default=8, help="--cluster netns: worker hosts (one worker each)")
    parser.add_argument("--distinct", type=int, default=100,
                        help="--cluster netns: distinct synthetic slides; --slides are hard links to them")
    parser.add_argument("--no-kill", dest="kill", action="store_false",
                        help="--cluster netns: let the first pass finish instead of killing it half way")
    parser.add_argument("--plan", type=int, default=10_000, help="also time planning this many slides (0: skip)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nic-scale"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    args = parser.parse_args()

    cohort = args.workdir / f"cohort-{args.size}"
    if args.cluster == "netns":
        return main_netns(args, cohort)
    paths = make_cohort(cohort, args.slides, args.size)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    jobs = plan_jobs(paths)
    planning = {args.slides: time.perf_counter() - start}
    if args.plan:
        planning[args.plan] = time_planning(cohort, args.plan)
    store = args.workdir / f"store-{args.cluster}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    procs = []
    if args.cluster == "separate":
        scheduler_file, procs = separate_cluster(args.workdir, args.workers)
        cluster = connect(scheduler_file=str(scheduler_file))
    else:
        cluster = connect(workers=args.workers, dashboard=False)
    try:
        with cluster as client:
            client.wait_for_workers(args.workers, timeout=120)
            idle = idle_scheduler_cpu(client)
            first = measured_run(jobs, store, client)
            print("first run", first, flush=True)
            rerun = measured_run(jobs, store, client)
            print("rerun", rerun, flush=True)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait()
    try:  # stores may no longer consolidate (an incremental index is replacing it)
        from nic_pipeline.compress.store import consolidate
    except ImportError:
        consolidating = None
    else:
        start = time.perf_counter()
        consolidate(store)
        consolidating = time.perf_counter() - start
    results = {"first": first, "rerun": rerun, "idle_scheduler_cpu": idle, "files": files_per_slide(store), "opening": time_opening(store),
               "planning": planning, "consolidate": consolidating, "load": load, "machine": machine(),
               "when": time.strftime("%Y-%m-%d %H:%M"), "args": {k: str(v) for k, v in vars(args).items()}}
    print(results, flush=True)
    (args.workdir / f"scale-{args.cluster}.json").write_text(json.dumps(results, indent=1, default=str))
    if not args.no_write:
        found = [json.loads((args.workdir / f"scale-{c}.json").read_text()) for c in ("embedded", "separate")
                 if (args.workdir / f"scale-{c}.json").exists()]
        replace_section(args.out, "## Scale", scale_section(found))


def main_netns(args, cohort: Path) -> None:
    """``--cluster netns``: the many-host run of :mod:`benchmarks.scale_netns`; its results go to
    ``scale-netns-<hosts>h-<slides>.json`` and a table at the end of the "Scale" section."""
    from benchmarks import scale_netns

    sources = make_cohort(cohort, min(args.slides, args.distinct), args.size)
    results = scale_netns.run(args, sources, TaskCounter)
    out = args.workdir / f"scale-netns-{args.hosts}h-{args.slides}.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {out}", flush=True)
    if not args.no_write:
        scale_netns.put_netns_table(args.out, scale_netns.netns_table(scale_netns.load_found(args.workdir)))


def per_task_ms(run: dict, key: str) -> str:
    return f"{1000 * run[key] / max(1, run['tasks']):.2f} ms"


def run_rows(found: list[dict]) -> list[str]:
    """The table of runs: one column per (cluster, first run | rerun)."""
    runs = [(r["args"]["cluster"], label, r[key]) for r in found
            for key, label in (("first", "first run"), ("rerun", "rerun, nothing to do"))]
    for r in found:
        for key in ("first", "rerun"):
            x = r[key]
            x["scheduler_cpu"] = x["scheduler_process_cpu" if x["scheduler_separate"] else "scheduler_thread_cpu"]
            x["scheduler_busy_cpu"] = x["scheduler_cpu"] - r["idle_scheduler_cpu"] * x["wall"]
    rows = {
        "slides": lambda x: ", ".join(f"{v:,} {k}" for k, v in x["slides"].items()),
        "tasks (scheduler's count)": lambda x: f"{x['tasks']:,}",
        "wall time": lambda x: f"{x['wall']:.1f} s",
        "tasks/s, tasks / wall": lambda x: f"{x['tasks'] / x['wall']:.1f}",
        "tasks/s, scheduler's view (first to last task done)": lambda x: f"{x['tasks'] / max(x['scheduler_span'], 1e-9):.1f}",
        "worker compute per task (detect / encode / finalize)": lambda x: " / ".join(
            f"{1000 * x['worker_busy'].get(k, 0) / max(1, x['by_kind'].get(k, 0)):.0f}"
            for k in ("detect-tissue", "encode-block", "finalize-slide")) + " ms",
        "scheduler CPU per task": lambda x: per_task_ms(x, "scheduler_cpu"),
        "scheduler CPU per task, less its idle baseline": lambda x: per_task_ms(x, "scheduler_busy_cpu"),
        "client main thread CPU per task": lambda x: per_task_ms(x, "client_main_cpu"),
        "client process CPU per task (all its threads)": lambda x: per_task_ms(x, "process_cpu"),
        "client RSS before / peak": lambda x: f"{x['client_rss_before_mb']:,.0f} / {x['client_peak_mb']:,.0f} MB",
        "patches encoded": lambda x: f"{x['patches']:,}",
    }
    lines = ["| measure | " + " | ".join(f"{cluster}: {label}" for cluster, label, _ in runs) + " |",
             "|---|" + "---|" * len(runs)]
    lines += [f"| {name} | " + " | ".join(cell(x) for _, _, x in runs) + " |" for name, cell in rows.items()]
    return lines


def scale_section(found: list[dict]) -> str:
    last = max(found, key=lambda r: r["when"])  # the store figures of the latest run
    files, opening, args = last["files"], last["opening"], last["args"]
    planning = {k: v for r in found for k, v in r["planning"].items()}
    n = opening["slides"]
    lines = [
        "## Scale",
        "",
        f"Measured by `python benchmarks/scale.py --cluster embedded|separate` on {last['machine']}, shared with "
        "other jobs (load average at the start: "
        + ", ".join(f"{r['args']['cluster']} {r['load']:.1f}" for r in found)
        + " on 2 cores), so wall times are upper bounds. "
        f"{int(args['slides']):,} synthetic slides of {int(args['size']):,}² px at 0.5 µm/px, compressed with the "
        f"defaults (NIC encoder, block 256, precision auto) by {args['workers']} single-threaded workers through "
        "`nic_pipeline.api.compress` (preflight included). `embedded`: `connect(workers=2)`, whose scheduler "
        "runs in the client's process, on the event-loop thread that the client's comms share (so its "
        "CPU includes the client's result gathering); `separate`: a `dask scheduler` process and two "
        "`dask worker` processes, as on a cluster (scheduler CPU = that process alone).",
        "",
        *run_rows(found),
        "",
        "Idle scheduler CPU (no tasks, 10 s): "
        + ", ".join(f"{r['args']['cluster']} {1000 * r['idle_scheduler_cpu']:.0f} ms/s" for r in found) + ".",
        "",
        f"Store: {files['mean']:.1f} files per slide on average (max {files['max']}), {files['root_files']} at the "
        f"root; the consolidated metadata (inline in the root `zarr.json`) is {files['root_metadata_mb']:.1f} MB "
        f"for {files['slides']:,} slides; " + (f"consolidating took {last['consolidate']:.1f} s ({last['args']['cluster']} run)." if last.get('consolidate') is not None else "no consolidation step."),
        "",
        f"Opening the store for training, every slide's attributes and tissue grid ({n:,} slides, warm page cache, "
        "local disk):",
        "",
        "| how | seconds | ms per slide |",
        "|---|---|---|",
        f"| `open_cohort` (consolidated metadata) + zarr attrs and tissue | {opening['consolidated']:.1f} | "
        f"{1000 * opening['consolidated'] / n:.1f} |",
        f"| `xarray.open_zarr(..., consolidated=False)` per slide | {opening['xarray_per_slide']:.1f} | "
        f"{1000 * opening['xarray_per_slide'] / n:.1f} |",
        f"| what `nic train` does today (`SlideSource.meta` + `tissue`) | {opening['train_today']:.1f} | "
        f"{1000 * opening['train_today'] / n:.1f} |",
        "",
        "Planning (`plan_jobs`, on the client before any task): "
        + ", ".join(f"{int(k):,} slides {v:.1f} s" for k, v in sorted(planning.items(), key=lambda kv: int(kv[0])))
        + " (10,000: hard links to the cohort's files).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
