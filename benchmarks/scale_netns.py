"""``benchmarks/scale.py --cluster netns --hosts N``: the compression graph on a many-host cluster.

One scheduler host and ``N`` worker hosts (one single-threaded ``dask worker`` each), each in its
own Linux network namespace on a private bridge (``tests/cluster/netns.py``; needs root and
``ip``); the client runs in the root namespace and the hosts share the file system. The cohort is
``--slides`` hard links (distinct names) to about 100 distinct synthetic slides.

1. the first pass is the CLI, ``python -m nic_pipeline compress LINKS --out STORE --scheduler ADDR``,
   with plain progress lines every second on its stderr; it is SIGKILLed once about half the
   slides are done (``--kill-at``);
2. 2 s later every slide's ``zarr.json`` is read once: the slides complete at the kill;
3. the rerun, in this process through :func:`nic_pipeline.api.compress` on a
   ``distributed.Client(ADDR)``, must encode exactly the blocks of the slides that were not
   complete, and skip the complete ones;
4. the store (files per slide, root ``zarr.json``, ``_index/``), ``nic inspect STORE`` (a
   subprocess) and the training open (``list_store_slides``, then ``SlideSource.meta`` and
   ``SlideSource.tissue`` for every slide) are timed.

Throughout: tasks per second (a scheduler plugin counts tasks reaching memory), the scheduler's
CPU (psutil on its pid, visible from the root namespace; less its idle baseline) and the
client's RSS every second (the CLI subprocess, then this process), against the slides done.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.compress import GENERATED_END, machine
from tests.cluster.netns import DaskCluster, Network, repo_env

PROGRESS = re.compile(r"^slides: ([\d,]+)/([\d,]+) slide")
TABLE_HEADING = "### Many hosts (`--cluster netns`)"


# --------------------------------------------------------------------------- the cohort


def link_cohort(sources: list[Path], n: int, folder: Path) -> Path:
    """``folder`` holding ``n`` hard links with distinct names to ``sources`` (made once)."""
    if folder.exists() and sum(1 for _ in folder.glob("*.tif")) == n:
        return folder
    part = folder.with_suffix(".partial")
    if part.exists():
        for old in part.iterdir():
            old.unlink()
    part.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        os.link(sources[i % len(sources)], part / f"s{i:05d}.tif")
    if folder.exists():
        for old in folder.iterdir():
            old.unlink()
        folder.rmdir()
    part.rename(folder)
    return folder


# --------------------------------------------------------------------------- progress and memory


class Progress:
    """Slides done as the plain progress lines say (``slides: 5,012/10,000 slide ...``)."""

    def __init__(self):
        self.done, self.total, self.lines = 0, 0, 0

    def feed(self, line: str) -> None:
        match = PROGRESS.match(line.strip())
        if match:
            self.lines += 1
            self.done, self.total = (int(g.replace(",", "")) for g in match.groups())


class TeeProgress:
    """A stand-in for ``sys.stderr`` that passes text through and parses the progress lines."""

    def __init__(self, stream, progress: Progress, log):
        self.stream, self.progress, self.log, self._part = stream, progress, log, ""

    def write(self, text: str) -> int:
        self.log.write(text)
        self._part += text
        *lines, self._part = self._part.split("\n")
        for line in lines:
            self.progress.feed(line)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


class RssSeries:
    """The RSS of process ``pid`` every ``interval`` s, with the slides done then: (s, MB, slides)."""

    def __init__(self, pid: int, progress: Progress, interval: float = 1.0):
        self.process, self.progress, self.interval = psutil.Process(pid), progress, interval
        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = time.perf_counter()

    def _sample(self) -> None:
        try:
            rss = self.process.memory_info().rss / 2**20
        except psutil.Error:  # the process is gone (killed)
            return
        self.samples.append((round(time.perf_counter() - self.start, 2), round(rss, 1), self.progress.done))

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self.interval):
            self._sample()

    @property
    def peak_mb(self) -> float:
        """The highest RSS sampled, MB (0 before the first sample)."""
        return max((mb for _, mb, _ in self.samples), default=0.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def rss_summary(samples: list) -> dict:
    """Start / middle / end MB of a series (from the first sample with a slide done, when the
    client is set up), its peak, and its slope in MB per 1,000 slides (a least-squares line of
    RSS against slides done, over those samples)."""
    samples = [s for s in samples if s[1] > 0]  # a killed process reads 0 until it is reaped
    if not samples:
        return {}
    moving = [(s[2], s[1]) for s in samples if s[2] > 0]
    mbs = [y for _, y in moving] or [s[1] for s in samples]  # from the first slide done: the client is set up
    slope = None
    if len({x for x, _ in moving}) >= 2:
        mx = sum(x for x, _ in moving) / len(moving)
        my = sum(y for _, y in moving) / len(moving)
        sxx = sum((x - mx) ** 2 for x, _ in moving)
        slope = 1000 * sum((x - mx) * (y - my) for x, y in moving) / sxx
    return {"start": mbs[0], "mid": mbs[len(mbs) // 2], "end": mbs[-1], "peak": max(s[1] for s in samples),
            "first_sample": samples[0][1], "slope_per_1000_slides": slope, "samples": len(samples)}


# --------------------------------------------------------------------------- the scheduler


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _pid(dask_scheduler=None) -> int:
    return os.getpid()


def register_counter(client, counter_cls) -> str:
    """A fresh task-counting plugin on the scheduler; its name."""
    import cloudpickle

    module = sys.modules.get(counter_cls.__module__)
    if module is not None and counter_cls.__module__ != "__main__":
        cloudpickle.register_pickle_by_value(module)  # the scheduler need not import the benchmark
    name = f"{counter_cls.name}-{time.time_ns()}"
    client.register_plugin(counter_cls(), name=name)
    return name


def counted(client, name: str) -> dict:
    def summary(name, dask_scheduler=None):
        return dask_scheduler.plugins[name].summary()

    return client.run_on_scheduler(summary, name)


# --------------------------------------------------------------------------- the store


def slide_folders(store: Path) -> list[Path]:
    return sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def read_status(store: Path) -> dict[str, tuple[str, int]]:
    """Every slide's status and block count, from its own zarr.json, read once."""
    out = {}
    for folder in slide_folders(store):
        try:
            attrs = json.loads((folder / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            out[folder.name] = ("unreadable", 0)
            continue
        out[folder.name] = (attrs.get("status", "in-progress"), len(attrs.get("blocks", {})))
    return out


def folder_bytes(path: Path) -> tuple[int, int]:
    """Files and bytes under ``path``."""
    files = size = 0
    for parent, _, names in os.walk(path):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(parent, name))
    return files, size


def store_stats(store: Path) -> dict:
    counts = [folder_bytes(p)[0] for p in slide_folders(store)]
    index = store / "_index"
    index_files, index_bytes = folder_bytes(index) if index.exists() else (0, 0)
    return {"slides": len(counts), "files_per_slide": sum(counts) / max(1, len(counts)), "max_files": max(counts, default=0),
            "root_files": sum(1 for p in store.iterdir() if p.is_file()),
            "root_zarr_json_mb": (store / "zarr.json").stat().st_size / 2**20,
            "index_present": index.exists(), "index_files": index_files, "index_mb": index_bytes / 2**20}


def time_inspect(store: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "nic_pipeline", "inspect", str(store)], capture_output=True,
                          text=True, env=repo_env(REPO, {"NIC_PROGRESS": "off"}), timeout=3600, check=False)
    wall = time.perf_counter() - start
    return {"seconds": wall, "rc": done.returncode, "stderr_tail": done.stderr[-500:], "lines": done.stdout.count("\n")}


def time_training_open(store: Path, sample: int = 200) -> dict:
    """What ``nic train`` does before its first fold: the complete slides (``_cohort``), every
    slide's shape and attributes (``_store_info``); then every slide's tissue grid (read once, for
    the crop centres) and, on ``sample`` slides, the full ``meta`` (coordinates and checks, what a
    heatmap reads per slide)."""
    from nic_pipeline.classify.graph import _store_info
    from nic_pipeline.classify.source import SlideSource, list_store_slides

    start = time.perf_counter()
    ids = list_store_slides(store)
    listed = time.perf_counter() - start
    source = SlideSource(store)
    start = time.perf_counter()
    _store_info(source, ids)
    info = time.perf_counter() - start
    start = time.perf_counter()
    for slide_id in ids:
        source.tissue(slide_id)
    tissue = time.perf_counter() - start
    start = time.perf_counter()
    for slide_id in ids[:sample]:
        SlideSource(store).meta(slide_id)
    meta_ms = 1000 * (time.perf_counter() - start) / max(1, min(sample, len(ids)))
    return {"slides": len(ids), "list": listed, "store_info": info, "open": listed + info, "tissue": tissue,
            "meta_ms_per_slide": meta_ms}


# --------------------------------------------------------------------------- the run


def first_pass(links: Path, store: Path, address: str, hosts: int, kill_at: int, logs: Path) -> dict:
    """The CLI on the cluster, SIGKILLed once ``kill_at`` slides are done (or left to finish when
    ``kill_at`` is 0); its RSS series and the slides done."""
    progress = Progress()
    env = repo_env(REPO, {"NIC_PROGRESS": "plain", "NIC_PROGRESS_INTERVAL": "1"})
    argv = [sys.executable, "-m", "nic_pipeline", "compress", str(links), "--out", str(store),
            "--scheduler", address, "--wait-workers", str(hosts)]
    log = open(logs / "first-pass.log", "w")  # noqa: SIM115 - closed once the reader thread is done
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.PIPE, text=True, bufsize=1)

    def read():
        for line in proc.stderr:
            log.write(line)
            progress.feed(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = None
    try:
        with RssSeries(proc.pid, progress) as rss:
            while proc.poll() is None:
                if kill_at and progress.done >= kill_at:
                    proc.send_signal(signal.SIGKILL)
                    killed = {"at_s": time.perf_counter() - start, "slides_done_by_progress": progress.done}
                    break
                time.sleep(0.05)
            proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        log.close()
    wall = time.perf_counter() - start
    return {"argv": argv, "wall": wall, "rc": proc.returncode, "killed": killed, "progress_lines": progress.lines,
            "slides_done": progress.done, "total": progress.total, "rss": rss_summary(rss.samples),
            "rss_series": rss.samples}


def rerun_in_process(links: Path, store: Path, client, hosts: int, logs: Path) -> dict:
    """``nic_pipeline.api.compress`` in this process on the same cluster, with its RSS series."""
    from collections import Counter

    from nic_pipeline.api import compress

    progress = Progress()
    saved = {k: os.environ.get(k) for k in ("NIC_PROGRESS", "NIC_PROGRESS_INTERVAL")}
    os.environ.update({"NIC_PROGRESS": "plain", "NIC_PROGRESS_INTERVAL": "1"})
    stderr = sys.stderr
    with open(logs / "rerun.log", "w") as log:
        sys.stderr = TeeProgress(stderr, progress, log)
        try:
            with RssSeries(os.getpid(), progress) as rss:
                start = time.perf_counter()
                report = compress(str(links), store, client, progress=True, wait_workers=hosts)
                wall = time.perf_counter() - start
        finally:
            sys.stderr = stderr
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    status = Counter(s.status for s in report.slides)
    return {"wall": wall, "slides": dict(status), "blocks_encoded": report.blocks_encoded,
            "blocks_skipped": sum(s.blocks_skipped for s in report.slides), "patches": report.patches,
            "skipped_ids": sorted(s.slide_id for s in report.slides if s.status == "skipped"),
            "failed": [(s.slide_id, s.error) for s in report.failed][:3],
            "rss": rss_summary(rss.samples), "rss_series": rss.samples, "progress_lines": progress.lines}


def run(args, cohort_paths: list[Path], counter_cls) -> dict:
    """The whole netns benchmark (see the module's docstring); returns the results."""
    from distributed import Client

    work = args.workdir
    links = link_cohort(cohort_paths, args.slides, work / f"links-{args.size}-{args.slides}")
    store = work / f"store-netns-{args.slides}.zarr"
    if store.exists():
        subprocess.run(["rm", "-rf", str(store)], check=True)
    logs = work / "netns-logs"
    logs.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    hosts = ["sched", *(f"node{i + 1}" for i in range(args.hosts))]
    commit = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h"], capture_output=True, text=True,
                            check=False).stdout.strip()
    results: dict = {"hosts": args.hosts, "slides": args.slides, "size": args.size, "load_start": load_start,
                     "commit": commit,
                     "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M"),
                     "args": {k: str(v) for k, v in vars(args).items()}}
    from nic_pipeline.runtime.cluster import _worker_environment

    with Network(hosts) as network:
        cluster = DaskCluster(network, "sched", work / "netns-cluster", REPO, Path(sys.executable).parent)
        try:
            start = time.perf_counter()
            address = cluster.start_scheduler()
            for host in hosts[1:]:
                cluster.start_worker(host, env=_worker_environment())
            workers = cluster.wait_workers(args.hosts, timeout=600)
            results["cluster_start_s"] = time.perf_counter() - start
            results["worker_hosts"] = sorted({w.split("//")[1].split(":")[0] for w in workers})
            print(f"{len(workers)} workers on {len(results['worker_hosts'])} hosts joined {address} "
                  f"in {results['cluster_start_s']:.0f} s", flush=True)
            with Client(address, timeout="60s") as client:
                scheduler = psutil.Process(client.run_on_scheduler(_pid))
                cpu0 = cpu_seconds(scheduler)
                time.sleep(10)
                idle = (cpu_seconds(scheduler) - cpu0) / 10
                results["idle_scheduler_cpu_per_s"] = idle

                # 1. the CLI, killed half way
                name = register_counter(client, counter_cls)
                cpu0 = cpu_seconds(scheduler)
                first = first_pass(links, store, address, args.hosts, args.slides // 2 if args.kill else 0, logs)
                first["scheduler_cpu"] = cpu_seconds(scheduler) - cpu0
                first.update(counted(client, name))
                print("first pass", {k: v for k, v in first.items() if k != "rss_series"}, flush=True)
                time.sleep(2)
                at_kill = read_status(store) if store.exists() else {}
                complete = {k: blocks for k, (status, blocks) in at_kill.items() if status == "complete"}
                results["at_kill"] = {"complete": len(complete), "complete_blocks": sum(complete.values()),
                                      "folders": len(at_kill)}
                print("at the kill", results["at_kill"], flush=True)

                # 2. the rerun, in this process
                name = register_counter(client, counter_cls)
                cpu0 = cpu_seconds(scheduler)
                rerun = rerun_in_process(links, store, client, args.hosts, logs)
                rerun["scheduler_cpu"] = cpu_seconds(scheduler) - cpu0
                rerun.update(counted(client, name))
                print("rerun", {k: v for k, v in rerun.items() if k not in ("rss_series", "skipped_ids")}, flush=True)
        finally:
            cluster.stop()
    for part in (first, rerun):
        part["tasks"] = sum(part["counts"].values())
        part["scheduler_busy_cpu"] = part["scheduler_cpu"] - idle * part["wall"]

    after = read_status(store)
    total_blocks = sum(blocks for _, blocks in after.values())
    expected = total_blocks - results["at_kill"]["complete_blocks"]
    skipped = set(rerun.pop("skipped_ids"))
    results["resume"] = {
        "complete_at_kill": len(complete), "skipped_in_rerun": len(skipped),
        "skipped_are_those_complete": skipped == set(complete),
        "blocks_total": total_blocks, "blocks_expected": expected, "blocks_encoded": rerun["blocks_encoded"],
        "blocks_already_written": rerun["blocks_skipped"],  # of slides killed part way (kept, not encoded again)
        "all_complete_after": all(status == "complete" for status, _ in after.values()) and len(after) == args.slides,
    }
    # nothing finished is done again: the complete slides are skipped, and of the others only the
    # blocks not yet written are encoded (those written before the kill are kept)
    results["resume"]["held"] = (rerun["blocks_encoded"] + rerun["blocks_skipped"] == expected
                                 and results["resume"]["skipped_are_those_complete"]
                                 and results["resume"]["all_complete_after"])
    print("resume", results["resume"], flush=True)
    results.update(first=first, rerun=rerun, store=store_stats(store))
    results["inspect"] = time_inspect(store)
    results["training_open"] = time_training_open(store)
    results["load_end"] = os.getloadavg()
    tasks, wall = first["tasks"] + rerun["tasks"], first["wall"] + rerun["wall"]
    results["combined"] = {"tasks": tasks, "wall": wall, "tasks_per_s": tasks / wall,
                           "scheduler_busy_cpu_per_task_ms": 1000 * (first["scheduler_busy_cpu"] + rerun["scheduler_busy_cpu"]) / max(1, tasks)}
    print({k: v for k, v in results.items() if k not in ("first", "rerun")}, flush=True)
    return results


# --------------------------------------------------------------------------- the table


def _ms(run: dict, key: str) -> str:
    return f"{1000 * run[key] / max(1, run['tasks']):.2f} ms"


def _rss(r: dict) -> str:
    if not r:
        return "n/a"
    slope = r.get("slope_per_1000_slides")
    slope = "n/a" if slope is None else f"{slope:+.0f}"
    return f"{r['start']:,.0f} / {r['mid']:,.0f} / {r['end']:,.0f} / {r['peak']:,.0f} MB ({slope} MB per 1,000 slides)"


def netns_table(found: list[dict]) -> str:
    """The many-host runs: one column per run (hosts × slides)."""
    found = sorted(found, key=lambda r: (r["hosts"], r["slides"]))
    last = max(found, key=lambda r: r["when"])
    rows = {
        "code (commit)": lambda r: r.get("commit", "?"),
        "hosts (scheduler + workers)": lambda r: f"1 + {r['hosts']}",
        "slides": lambda r: f"{r['slides']:,}",
        "first pass (CLI, killed): tasks, wall, tasks/s": lambda r: (
            f"{r['first']['tasks']:,}, {r['first']['wall']:.1f} s, {r['first']['tasks'] / r['first']['wall']:.1f}"),
        "rerun (in process): tasks, wall, tasks/s": lambda r: (
            f"{r['rerun']['tasks']:,}, {r['rerun']['wall']:.1f} s, {r['rerun']['tasks'] / r['rerun']['wall']:.1f}"),
        "both: tasks, wall, tasks/s": lambda r: (
            f"{r['combined']['tasks']:,}, {r['combined']['wall']:.1f} s, {r['combined']['tasks_per_s']:.1f}"),
        "scheduler CPU per task, less idle (first / rerun)": lambda r: (
            f"{_ms(r['first'], 'scheduler_busy_cpu')} / {_ms(r['rerun'], 'scheduler_busy_cpu')}"),
        "scheduler CPU per slide, less idle (first / rerun)": lambda r: (
            f"{1000 * r['first']['scheduler_busy_cpu'] / max(1, r['first']['counts'].get('detect-tissue', 0)):.1f} ms / "
            f"{1000 * r['rerun']['scheduler_busy_cpu'] / r['slides']:.1f} ms"),
        "client RSS start / mid / end / peak, first pass (CLI)": lambda r: _rss(rss_summary(r["first"]["rss_series"])),
        "client RSS start / mid / end / peak, rerun (this process)": lambda r: _rss(rss_summary(r["rerun"]["rss_series"])),
        "files per slide": lambda r: f"{r['store']['files_per_slide']:.1f} (max {r['store']['max_files']})",
        "root zarr.json": lambda r: f"{r['store']['root_zarr_json_mb']:.3f} MB",
        "`_index/`": lambda r: (f"{r['store']['index_mb']:.2f} MB, {r['store']['index_files']} files"
                                if r["store"]["index_present"] else "none"),
        "`nic inspect STORE`": lambda r: f"{r['inspect']['seconds']:.1f} s" + ("" if r["inspect"]["rc"] == 0 else " (failed)"),
        "training open: list + shapes and attributes = open": lambda r: (
            f"{r['training_open']['list']:.1f} + {r['training_open']['store_info']:.1f} = "
            f"{r['training_open']['open']:.1f} s"),
        "then: every tissue grid (crop centres); full meta per slide (heatmaps)": lambda r: (
            f"{r['training_open']['tissue']:.1f} s; {r['training_open']['meta_ms_per_slide']:.1f} ms"),
        "resume: complete at the kill": lambda r: f"{r['resume']['complete_at_kill']:,} of {r['slides']:,}",
        "resume: slides skipped by the rerun": lambda r: f"{r['resume']['skipped_in_rerun']:,}",
        "resume: blocks encoded / expected (kept from part-done slides)": lambda r: (
            f"{r['resume']['blocks_encoded']:,} / {r['resume']['blocks_expected']:,} "
            f"({r['resume']['blocks_already_written']:,})"),
        "resume: nothing finished done again": lambda r: "yes" if r["resume"]["held"] else "**no**",
        "load average (start / end)": lambda r: f"{r['load_start'][0]:.1f} / {r['load_end'][0]:.1f}",
    }
    lines = [
        TABLE_HEADING,
        "",
        (f"Measured by `python benchmarks/scale.py --cluster netns --hosts N --slides S --size {last['size']}` on "
         f"{last['machine']}, shared with other jobs: one `dask scheduler` host and N hosts of one single-threaded "
         "`dask worker` each, in Linux network namespaces on one machine (tests/cluster/netns.py), the client in "
         "the root namespace. The cohort is S hard links (distinct names) to about 100 synthetic slides. The "
         "first pass is `nic compress ... --scheduler ADDR` as a subprocess, SIGKILLed at about half the slides; "
         "the rerun is `nic_pipeline.api.compress` in the benchmark's process on the same cluster. Client RSS "
         "is sampled every second (slope: a least-squares line against slides done). Scheduler CPU: psutil "
         "on its pid, less its idle rate × wall."),
        "",
        "| measure | " + " | ".join(f"{r['hosts']} hosts, {r['slides']:,} slides" for r in found) + " |",
        "|---|" + "---|" * len(found),
    ]
    lines += [f"| {name} | " + " | ".join(cell(r) for r in found) + " |" for name, cell in rows.items()]
    return "\n".join(lines) + "\n"


def put_netns_table(path: Path, table: str) -> None:
    """Put the netns table at the end of the generated part of "## Scale" (replacing an earlier
    one), leaving the rest of the section as it is."""
    text = path.read_text()
    start = text.find("## Scale\n")
    if start < 0:
        text = text.rstrip() + "\n\n## Scale\n\n" + table + "\n" + GENERATED_END + "\n"
    else:
        end = text.find("\n## ", start + 1)
        end = len(text) if end < 0 else end + 1
        marker = text.find(GENERATED_END, start, end)
        if marker < 0:
            text = text[:end].rstrip("\n") + "\n\n" + table + "\n" + GENERATED_END + "\n\n" + text[end:]
        else:
            old = text.find(TABLE_HEADING, start, marker)
            cut = old if old >= 0 else marker
            text = text[:cut] + table + "\n" + text[marker:]
    path.write_text(text)
    print(table)


def load_found(work: Path) -> list[dict]:
    found = []
    for path in sorted(work.glob("scale-netns-*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except ValueError:
            pass
    return found
