"""The whole ``nic compress`` command against the machine's floor: ``python benchmarks/compress.py --cli``.

The command is run cold, as a user runs it (Python start, cluster start, model load, until the
process exits), and its patches/s divided by the floor that the precision policy allows
(:data:`POLICIES`). A second run of the same command, traced (:func:`traced_cli`: time stamps
around its stages and Dask's task stream), says where the time goes.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.compress import (  # noqa: E402
    decode_floor_cucim,
    decode_floor_tifffile,
    encoder_floor,
    fastest,
    machine,
    make_slide,
    replace_section,
    tissue_cells,
)

POLICIES = {"native": ("fp32", "bf16"), "avx2": ("fp32",)}
"""Precisions the floor may use under each policy: a CPU with native bf16 may pick either; an
AVX2-only CPU's policy is fp32 (its bf16 is emulated and slower)."""


def _worker_loads(dask_worker=None) -> list:
    """(start, end) of every encoder load on this worker."""
    plugin = dask_worker.plugins.get("nic-worker")
    return [(start, end) for _, start, end in getattr(plugin, "loads", [])]


def traced_cli(trace: Path, argv: list[str]) -> None:
    """Run ``python -m nic_pipeline ARGV`` in this process, recording when its stages begin and end
    (wall-clock times, comparable across the processes of this machine) into ``trace``."""
    events: dict[str, float] = {}
    tasks, loads = [], {}
    from importlib import import_module

    from distributed import get_task_stream

    # import_module: the attribute nic_pipeline.compress is the front door's function, not the package
    api, cli, graph, cluster = map(import_module, ("nic_pipeline.compress.api", "nic_pipeline.cli", "nic_pipeline.compress.graph",
                                                   "nic_pipeline.runtime.cluster"))

    events["imported"] = time.time()

    def stamp(module, name, body=None):
        original = getattr(module, name)

        def run(*args, **kwargs):
            events[f"{name} start"] = time.time()
            try:
                return body(original, *args, **kwargs) if body else original(*args, **kwargs)
            finally:
                events[f"{name} end"] = time.time()

        setattr(module, name, run)
        return run

    def compress_traced(original, jobs, store, client, *args, **kwargs):
        with get_task_stream(client) as stream:
            report = original(jobs, store, client, *args, **kwargs)
        tasks.extend({"kind": str(t["key"][0]) if isinstance(t["key"], tuple) else str(t["key"]),
                      "worker": t["worker"], **next(s for s in t["startstops"] if s["action"] == "compute")}
                     for t in stream.data)
        loads.update(client.run(_worker_loads))
        return report

    stamp(cluster, "start_local_cluster")
    stamp(api, "preflight")
    api.run_compress = graph.compress = stamp(graph, "compress", compress_traced)
    try:
        cli.main(argv, standalone_mode=False)
    finally:
        events["cli end"] = time.time()
        gc.freeze()  # as `nic` does on its way out (nic_pipeline.cli.run)
        trace.write_text(json.dumps({"events": events, "tasks": tasks, "loads": loads}, default=str))


def run_cli(slide: Path, store: Path, env: dict, block: int | None, trace: Path | None = None) -> dict:
    """Run ``nic compress`` on ``slide`` (a file, or a folder of slides) cold (fresh cluster, fresh
    store) and time it from outside."""
    import shutil

    import zarr

    shutil.rmtree(store, ignore_errors=True)
    argv = ["compress", str(slide), "--out", str(store), "--workers", "2", *(["--block", str(block)] if block else [])]
    command = ([sys.executable, __file__, str(trace), *argv] if trace
               else [sys.executable, "-m", "nic_pipeline", *argv])
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and every process it waited for
    cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    root = zarr.open_group(str(store), mode="r")
    slides = [root[name].attrs for name in sorted(root.group_keys())]
    blocks = [b for attrs in slides for b in attrs["blocks"].values()]
    result = {"wall": wall, "cpu": cpu, "start": start, "block": slides[0]["block"], "blocks": len(blocks),
              "slides": len(slides), "precisions": sorted({b.get("precision") for b in blocks}),
              "patches": int(done.stdout.split(" patches encoded")[0].rsplit("(", 1)[1])}
    if trace:
        result["trace"] = json.loads(trace.read_text())
    print({k: v for k, v in result.items() if k != "trace"}, flush=True)
    return result


def run_warm(slide: Path, store: Path, env: dict, block: int | None, workdir: Path) -> dict:
    """The same command on a warm cluster (``nic cluster start --workers 2`` beforehand, with the
    same environment): one command to load the encoder on its workers, then the timed one."""
    env = {**env, "NIC_CLUSTER_FILE": str(workdir / "warm-cluster.json")}
    nic = [sys.executable, "-m", "nic_pipeline", "cluster"]
    subprocess.run([*nic, "start", "--workers", "2"], env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
    try:
        run_cli(slide, store, env, block)  # loads the encoder on the warm workers
        return run_cli(slide, store, env, block)
    finally:
        subprocess.run([*nic, "stop"], env=env, cwd=REPO, check=False, capture_output=True, timeout=120)


def breakdown(run: dict, floor: float) -> dict:
    """Seconds of each stage of a traced run, from the command's start to its exit."""
    events, tasks, t0 = run["trace"]["events"], run["trace"]["tasks"], run["start"]
    kind = lambda k: [t for t in tasks if t["kind"] == k]  # noqa: E731
    detect, encode, final = kind("detect-tissue"), kind("encode-block"), kind("finalize-slide")
    first_encode, last_encode = min(t["start"] for t in encode), max(t["stop"] for t in encode)
    busy = {}
    for t in encode:
        busy[t["worker"]] = busy.get(t["worker"], 0) + t["stop"] - t["start"]
    loads = [(round(start - events["compress start"], 1), round(stop - start, 1))
             for runs in run["trace"]["loads"].values() for start, stop in runs]
    return {
        "python start + imports": events["imported"] - t0,
        "cluster start": events["start_local_cluster end"] - events["start_local_cluster start"],
        "client, preflight, store": events["compress start"] - events["start_local_cluster end"],
        "until detect-tissue starts": min(t["start"] for t in detect) - events["compress start"],
        "detect-tissue": sum(t["stop"] - t["start"] for t in detect),
        "detect end to first encode": first_encode - max(t["stop"] for t in detect),
        "encode phase": last_encode - first_encode,
        "finalize + manifest": events["compress end"] - last_encode,
        "cluster shutdown": events["cli end"] - events["compress end"],
        "interpreter exit": run["wall"] - (events["cli end"] - t0),
        "-- encoder load per worker (began after compress start + took, s; torch import included)":
            ", ".join(f"{start} + {took}" for start, took in loads),
        "-- encode busy per worker": ", ".join(f"{v:.1f}" for v in sorted(busy.values())),
        "-- encode phase rate / floor": run["patches"] / (last_encode - first_encode) / floor,
        "-- finalize": sum(t["stop"] - t["start"] for t in final),
    }


def floor_now(slide: Path, xs, ys, policy: str, seconds: float) -> dict:
    """The floor as :func:`benchmarks.compress.main` measures it, now (the machine is shared, so
    it is measured right before and right after each command it is compared with)."""
    decoders = {"cuCIM batched read_region": decode_floor_cucim(slide, xs, ys, 128)}
    cpu = time.process_time()
    decoders["tifffile + imagecodecs raw tiles"] = decode_floor_tifffile(slide, xs, ys, 128)
    decode_cpu = (time.process_time() - cpu) / len(xs)  # reading the tiles' bytes included: an upper bound
    encoders = encoder_floor("nic", 128, seconds=seconds, precisions=POLICIES[policy])
    encode_cpu = min(1 / v for k, v in encoders.items() if k.endswith("per CPU-s"))
    decode, encode = max(decoders.values()), fastest(encoders)
    return {"floor": 1 / (1 / decode + 1 / encode), "cpu_per_patch": decode_cpu + encode_cpu,
            "decoders": decoders, "encoders": encoders, "load": os.getloadavg()[0]}


def whole_command(args) -> None:
    """Time the whole ``nic compress`` command against the floor, for each input, policy and block asked."""
    for size in args.cli_sizes:
        slide = make_slide(args.workdir / f"bench_{size}.tif", size)
        xs, ys = tissue_cells(slide, 128)
        for copies in args.cli_copies:
            source = slide if copies == 1 else cohort_of(slide, copies)
            for policy in args.cli:
                env = {**os.environ, "PYTHONPATH": str(REPO), **({"NIC_CPU_BF16": "0"} if policy == "avx2" else {})}
                runs = [measure(source, slide, xs, ys, policy, block, env, args) for block in args.cli_blocks]
                record = {"policy": policy, "size": size, "copies": copies, "runs": runs,
                          "when": time.strftime("%Y-%m-%d %H:%M")}
                (args.workdir / f"cli-{policy}-{size}x{copies}.json").write_text(json.dumps(record, indent=1))
    records = sorted((json.loads(path.read_text()) for path in args.workdir.glob("cli-*-*x*.json")),
                     key=lambda r: (r["size"] * r["copies"], r["copies"], r["policy"]))  # every input measured here
    replace_section(args.out, "## Compression: the whole command", cli_section(records))


def cohort_of(slide: Path, copies: int) -> Path:
    """A folder of ``copies`` hard links to ``slide`` under other names: a cohort of identical slides."""
    folder = slide.parent / f"{slide.stem}x{copies}"
    folder.mkdir(exist_ok=True)
    for i in range(copies):
        link = folder / f"{slide.stem}_{i}{slide.suffix}"
        if not link.exists():
            os.link(slide, link)
    return folder


def measure(source: Path, slide: Path, xs, ys, policy: str, block: int, env: dict, args) -> dict:
    """One row: the floor (on ``slide``), a plain run and a traced run (on ``source``), the floor again."""
    before = floor_now(slide, xs, ys, policy, args.floor_seconds)
    store = args.workdir / f"cli-{policy}.zarr"
    plain = run_cli(source, store, env, block)
    traced = run_cli(source, store, env, block, trace=args.workdir / f"trace-{policy}.json")
    warm = run_warm(source, store, env, block, args.workdir) if args.cli_warm else None
    after = floor_now(slide, xs, ys, policy, args.floor_seconds)
    floor = (before["floor"] + after["floor"]) / 2
    run = {"asked_block": block, "plain": plain, "traced_wall": traced["wall"], "traced_cpu": traced["cpu"],
           "floor": floor, "cpu_per_patch": min(before["cpu_per_patch"], after["cpu_per_patch"]),
           "floors": [before, after], "breakdown": breakdown(traced, floor), "warm": warm}
    print(source.name, policy, block, plain["patches"] / plain["wall"] / floor, run["breakdown"], flush=True)
    return run


def _input(record: dict) -> str:
    copies = record.get("copies", 1)
    return f"{record['size']:,}²" if copies == 1 else f"{copies} x {record['size']:,}²"


def _warm(run: dict) -> str:
    warm = run.get("warm")
    return f"{warm['wall']:.1f}, **{warm['patches'] / warm['wall'] / run['floor']:.2f}**" if warm else "-"


def cli_section(records: list[dict]) -> str:
    lines = [
        "## Compression: the whole command",
        "",
        f"Measured by `python benchmarks/compress.py --cli native avx2` on {machine()}, shared with other jobs. "
        "`python -m nic_pipeline compress INPUT --out STORE --workers 2`, cold: Python start, cluster "
        "start, model load, everything until the process exits. INPUT is one synthetic slide of SIZE² px at "
        "0.5 µm/px (about 35-40% tissue), or a folder of N copies of it (hard links under other names: a "
        "cohort). Floor: best decode floor combined with the best encoder floor "
        "allowed by the policy, 1/(1/d+1/e), measured as in the Compression section, right before and right "
        "after the two runs of each row (mean of the two; the machine is shared, so the floor moves with "
        "the load). Policy `avx2` is this same CPU with `NIC_CPU_BF16=0` in the workers' environment and "
        "an fp32-only floor: the choice an AVX2-only CPU makes, not a measurement of one. CPU: user+system "
        "seconds of the command and all its processes; CPU floor: the floor's CPU seconds per patch (decode + "
        "encode, the cheaper of the two probes) times the patches, a cost that the machine's load moves much "
        "less than wall time; CPU efficiency = CPU floor / CPU.",
        "",
        "| input | policy | block (cells) | blocks | precision used | floor before / after (patches/s) | load avg | "
        "patches | wall (s) | patches/s | whole command / floor | traced run: wall (s), / floor | "
        "CPU (s) | CPU floor (s) | CPU efficiency | warm cluster (`--cli-warm`): wall (s), / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        for run in rec["runs"]:
            plain, floors = run["plain"], run["floors"]
            rate, ideal_cpu = plain["patches"] / plain["wall"], plain["patches"] * run["cpu_per_patch"]
            lines.append(
                f"| {_input(rec)} | {rec['policy']} | {plain['block']}{'' if run['asked_block'] else ' (CLI default)'} | "
                f"{plain['blocks']} | {', '.join(plain['precisions'])} | "
                f"{floors[0]['floor']:,.0f} / {floors[1]['floor']:,.0f} | "
                f"{floors[0]['load']:.1f} / {floors[1]['load']:.1f} | {plain['patches']:,} | {plain['wall']:.1f} | "
                f"{rate:,.0f} | **{rate / run['floor']:.2f}** | "
                f"{run['traced_wall']:.1f}, {plain['patches'] / run['traced_wall'] / run['floor']:.2f} | "
                f"{plain['cpu']:.0f} | {ideal_cpu:.0f} | {ideal_cpu / plain['cpu']:.2f} | {_warm(run)} |")
    lines += ["", "Where the time goes in the traced run (the same command through `nic_pipeline.cli.main`, with time "
              "stamps around its stages and Dask's task stream; seconds; ideal = patches / floor):", ""]
    for rec in records:
        for run in rec["runs"]:
            parts = "; ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in run["breakdown"].items())
            lines.append(f"- {_input(rec)}, {rec['policy']}, block {run['plain']['block']} (wall {run['traced_wall']:.1f} s, "
                         f"ideal {run['plain']['patches'] / run['floor']:.1f} s): {parts}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # the traced child: whole_command.py TRACE_JSON compress ARGS...
    traced_cli(Path(sys.argv[1]), sys.argv[2:])
