"""The GPU benchmark (issue 14): one script, one GPU, under 8 minutes. docs/benchmarks.md, section
"GPU", says what it measures and how to run it on the lent machine.

    bash benchmarks/gpu-run.sh                 # on the GPU machine: installs the carried wheels, runs this
    python benchmarks/gpu.py --dry-run         # every step on the CPU with tiny slides; docs/ untouched

Steps, each timed against a budget (a step that no longer fits is skipped and says so) and kept
apart (one that fails is recorded and the run goes on): the card and versions; the ``gpu``-marked
tests, while synthetic 40x-like slides (0.25 µm/px, cached) render on every core; tissue detection
and decode of the same tissue cells, CPU vs GPU, each in a fresh process (cuCIM picks its decoder
once per process); the encoders alone at fp16 and fp32; GPU vs CPU codes of a small slide; end to
end through the API on a warm cluster (its start timed apart) and as the ``nic compress`` command;
last, with the budget left, the foundation presets alone (issue 23): random weights built on the
GPU itself (no CPU copy, no meta tensors), fp16 and bf16 autocast, attention through PyTorch's
``scaled_dot_product_attention`` (``benchmarks/vit_speed.py``). ``--presets-only`` runs just those.
The JSON of results is rewritten after every step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import gpu_report  # noqa: E402
import vit_speed  # noqa: E402
from gpu_probes import MIN_TISSUE, NIC_PATCH  # noqa: E402
from nic_pipeline import api  # noqa: E402
from nic_pipeline.compress.codes import build_encoder, default_batch_size, encode_patches  # noqa: E402
from nic_pipeline.compress.encode import EncoderSettings  # noqa: E402
from nic_pipeline.compress.dataset import open_slide_tensor  # noqa: E402
from nic_pipeline.compress.catalog import describe_store  # noqa: E402
from nic_pipeline.io.cucim_backend import nvimgcodec_version  # noqa: E402
from nic_pipeline.runtime.cluster import connect  # noqa: E402
from nic_pipeline.runtime.device import gpu_count, usable_cpus  # noqa: E402

NIC = ("nic", NIC_PATCH)  # encoder, patch px (both encoders read at 0.5 µm/px)
RESNET = ("resnet50-trunc", 224)
PROBES = REPO / "benchmarks" / "gpu_probes.py"
PRESETS = ("kaiko-vits16", "phikon", "uni", "virchow2", "uni2-h", "h-optimus-1", "prov-gigapath", "midnight")
"""Foundation presets timed on the GPU, one per architecture class, smallest first (the budget may end first)."""
PRESET_BATCH = 64
GPU_BLOCK, CPU_BLOCK = 256, 32  # cells per block side: the pipeline's default; small enough to share among threads


@dataclass(frozen=True)
class Sizes:
    slide: tuple[int, int]
    big: tuple[int, int]
    small: tuple[int, int]
    seconds: float  # how long each rate is measured for
    budget: float  # seconds for the whole run
    max_batch: int | None = None  # encoder batches no larger (None: the workers' batch size)
    workers: int | None = None  # of the embedded clusters (None: one per GPU)


FULL = Sizes((50_000, 40_000), (100_000, 80_000), (4096, 4096), 4.0, 450.0)
DRY = Sizes((3072, 2560), (4096, 3072), (1536, 1536), 0.3, 1200.0, max_batch=8, workers=1)


class Bench:
    """The results so far, the time left, and where they are written."""

    def __init__(self, args, sizes: Sizes):
        self.args, self.sizes, self.start = args, sizes, time.perf_counter()
        self.budget = args.budget or sizes.budget
        self.device = "cuda" if gpu_count() else "cpu"
        self.results = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d"), "rows": {}, "skipped": {}}
        self.synth = None  # the background synthesis process
        self.outs = [args.workdir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
        for folder in self.outs:
            folder.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def row(self, key: str, **values) -> None:
        self.results["rows"][key] = values
        print(f"[{time.perf_counter() - self.start:5.0f} s] {key}: {json.dumps(values, default=str)}", flush=True)
        self.save()

    def step(self, keys: list[str], estimate: float, run) -> None:
        """Run one step, or record why its rows are missing (out of time, or its error)."""
        if self.left() < estimate:
            why = f"skipped: {self.left():.0f} s of the budget left, the step needs ~{estimate:.0f} s"
        else:
            try:
                run()
                return
            except Exception as err:  # one broken step must not cost the other figures
                traceback.print_exc()
                why = f"failed: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"
        for key in keys:
            if key not in self.results["rows"]:
                self.results["skipped"].setdefault(key, why)
        print(f"{', '.join(keys)}: {why}", flush=True)
        self.save()

    def save(self) -> None:
        self.results["seconds"] = round(time.perf_counter() - self.start, 1)
        for folder in self.outs:
            (folder / "gpu-benchmark.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------ machine and tests


def versions() -> dict:
    """Versions of what decides the figures (distribution names differ by CUDA: cupy-cuda13x...)."""
    found = {"python": sys.version.split()[0], "cpus": usable_cpus()}
    dists = importlib.metadata.packages_distributions()
    for module in ("torch", "cupy", "cucim", "dask", "distributed", "dask_cuda", "zarr"):
        for dist in dists.get(module, []):
            found[module] = f"{importlib.metadata.version(dist)} ({dist})" if dist.replace("-", "_") != module else \
                importlib.metadata.version(dist)
    found["nvimgcodec"] = nvimgcodec_version()
    return found


def machine(bench: Bench) -> None:
    info = versions()
    info["torch_cuda"] = torch.version.cuda
    if bench.device == "cuda":
        import cupy

        props = torch.cuda.get_device_properties(0)
        driver = cupy.cuda.runtime.driverGetVersion()
        info.update(card=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    driver_cuda=f"{driver // 1000}.{driver % 1000 // 10}")
    else:
        info["card"] = "none (dry run on the CPU)"
    bench.results["machine"] = info
    print(json.dumps(info, indent=1), flush=True)


SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def pytest_counts(output: str) -> dict:
    """{"passed": n, ...} from pytest's closing line."""
    lines = [line for line in output.splitlines() if SUMMARY.search(line)]
    counts = {word.rstrip("s") if word.startswith("error") else word: int(n)
              for n, word in SUMMARY.findall(lines[-1])} if lines else {}
    return {k: counts.get(k, 0) for k in ("passed", "failed", "skipped", "error", "deselected")}


def gpu_tests(bench: Bench, timeout: float) -> None:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--timeout", "300", "tests"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    for folder in bench.outs:
        (folder / "pytest-gpu.txt").write_text(done.stdout + done.stderr)
    print(done.stdout[-3000:], flush=True)
    bench.row("tests", exit_code=done.returncode, seconds=time.perf_counter() - start, **pytest_counts(done.stdout))


# ------------------------------------------------------------------------------ slides


def slide_path(bench: Bench, size: tuple[int, int]) -> Path:
    return bench.args.workdir / "slides" / f"synth_{size[0]}x{size[1]}.tif"


def wait_for(path: Path, process, timeout: float) -> Path:
    """The slide at ``path``, once the background synthesis has written it."""
    deadline = time.perf_counter() + timeout
    while not path.exists():
        if process is None or process.poll() is not None or time.perf_counter() > deadline:
            raise RuntimeError(f"{path.name} was not synthesized (synthesis {'ended' if process else 'not started'})")
        time.sleep(0.5)
    return path


# ------------------------------------------------------------------------------ probes (fresh processes)


def probe(kind: str, timeout: float = 300, env: dict | None = None, **kwargs) -> dict:
    """Run a probe of benchmarks/gpu_probes.py in a fresh process (its own cuCIM decoder) and return its JSON."""
    environ = {k: v for k, v in os.environ.items() if k != "ENABLE_CUSLIDE2"}
    done = subprocess.run([sys.executable, str(PROBES), kind, json.dumps(kwargs)], capture_output=True,
                          text=True, timeout=timeout, env={**environ, **(env or {})}, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"probe {kind} failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ measurements


def tissue_and_decode(bench: Bench, slide: Path) -> None:
    """Tissue CPU vs GPU (and the NIC grid's tissue for the decode probes), then decode."""
    work, gpu = bench.args.workdir, bench.device
    coverage = str(work / "coverage.npy")
    cpu = probe("tissue", env={"ENABLE_CUSLIDE2": "0"}, slide=str(slide), device="cpu",
                mask_out=str(work / "mask-cpu.npy"), coverage_out=coverage)
    bench.row("tissue-cpu", **cpu)
    on_gpu = probe("tissue", slide=str(slide), device=gpu, mask_out=str(work / "mask-gpu.npy"))
    agree = float((np.load(work / "mask-cpu.npy") == np.load(work / "mask-gpu.npy")).mean())
    bench.row("tissue-gpu", **on_gpu, agreement=agree)
    seconds = bench.sizes.seconds
    runs = {"decode-cpu": ({"ENABLE_CUSLIDE2": "0"}, "cpu", usable_cpus(), CPU_BLOCK, True),
            "decode-gpu-cuslide": ({"ENABLE_CUSLIDE2": "0"}, gpu, 1, GPU_BLOCK, True),
            "decode-gpu-nvimgcodec": ({}, gpu, 1, GPU_BLOCK, True),
            "decode-gpu-nvimgcodec-nocheck": ({}, gpu, 1, GPU_BLOCK, False)}
    for key, (env, device, threads, block, check) in runs.items():
        settings = {"slide": str(slide), "device": device, "coverage": coverage, "threads": threads, "block": block,
                    "seconds": seconds, "check_tiles": check}
        bench.step([key], 15, lambda key=key, env=env, settings=settings: bench.row(
            key, **probe("decode", env=env, **settings)))


def encode_rate(name: str, patch: int, precision: str, device: str, seconds: float, max_batch: int | None) -> dict:
    """Patches/s of the encoder alone on random uint8 patches already on ``device``."""
    module = build_encoder(EncoderSettings(name, random_init=name != "nic"), device)
    batch = min(default_batch_size(patch), max_batch or patch**2)
    x = torch.randint(0, 256, (batch, patch, patch, 3), dtype=torch.uint8, device=device)
    encode_patches(module, x, precision, batch)  # warm-up (cuDNN picks its kernels)
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < seconds:
        encode_patches(module, x, precision, batch)  # returns host codes: the device has finished
        n += batch
    elapsed = time.perf_counter() - start
    return {"patches": n, "seconds": elapsed, "rate": n / elapsed, "batch": batch, "device": device}


def store_path(bench: Bench, name: str) -> Path:
    """A fresh store's path, in a folder that exists (the workers check they can see it)."""
    path = bench.args.workdir / "stores" / f"{name}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def compress_api(bench: Bench, client, slide: Path, encoder: str, store: str, **options) -> dict:
    """One slide through the API on the running cluster; patches/s and what the blocks ran with."""
    path = store_path(bench, store)
    report = api.compress(str(slide), str(path), client=client, encoder=encoder, random_init=encoder != "nic",
                          progress=False, **options)
    result = report.slides[0]
    if result.status != "complete":
        raise RuntimeError(f"{slide.name}: {result.status}: {result.error}")
    described = describe_store(path)[0]
    return {"patches": report.patches, "seconds": report.seconds, "rate": report.patches / report.seconds,
            "decoders": described["decoders"], "precisions": described["precisions"], "store": str(path)}


def compare_codes(store: str, reference: str) -> dict:
    """Max abs and relative difference of two stores' codes over the cells both encoded (the GPU's
    tissue mask may differ from the CPU's by a few pixels: those cells are counted apart)."""
    slide_id = describe_store(reference)[0]["slide_id"]
    a, b = open_slide_tensor(store, slide_id), open_slide_tensor(reference, slide_id)
    in_a, in_b = a["tissue"].values >= MIN_TISSUE, b["tissue"].values >= MIN_TISSUE
    cells = in_a & in_b
    x = a["features"].values[:, cells].astype(np.float32)
    y = b["features"].values[:, cells].astype(np.float32)
    return {"cells": int(cells.sum()), "cells_in_one_only": int((in_a ^ in_b).sum()), "max_abs": float(np.abs(x - y).max()),
            "relative": float(np.linalg.norm(x - y) / np.linalg.norm(y)), "max_code": float(np.abs(y).max()),
            "within_tolerance": bool(np.allclose(x, y, rtol=2e-2, atol=2e-2))}


def compress_command(bench: Bench, slide: Path, encoder: str, store: str, env: dict | None = None, *extra) -> dict:
    """`nic compress` in a fresh process: wall time from the command line, and the run's own time."""
    path = store_path(bench, store)
    workers = ["--workers", str(bench.sizes.workers)] if bench.sizes.workers and "--workers" not in extra else []
    command = [sys.executable, "-m", "nic_pipeline", "compress", str(slide), "--out", str(path), "--encoder", encoder,
               *(["--random-init"] if encoder != "nic" else []), *workers, *extra]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    found = re.search(r"(\d+) patches encoded in \d+ blocks this run, ([\d.]+) s", done.stdout)
    if done.returncode or not found:
        raise RuntimeError(f"`nic compress` failed ({done.returncode}): {(done.stdout + done.stderr).strip()[-1500:]}")
    patches, seconds = int(found[1]), float(found[2])
    described = describe_store(path)[0]
    return {"patches": patches, "seconds": seconds, "rate": patches / seconds, "wall_s": wall,
            "decoders": described["decoders"], "precisions": described["precisions"], "store": str(path)}


E2E_KEYS = ["codes-cpu", "cluster-start", "codes-gpu-fp16", "codes-gpu-fp32", "warm-resnet", "api-nic-slide",
            "api-resnet50-trunc-slide", "synth-big", "api-nic-big", "api-resnet50-trunc-big"]


def end_to_end(bench: Bench, slides: dict, synth, big: bool) -> None:
    """Small-slide codes (GPU fp16 and fp32 against a CPU-only run), cluster start, API runs."""
    small = slides["small"]
    bench.step(["codes-cpu"], 40, lambda: bench.row("codes-cpu", **compress_command(
        bench, small, "nic", "small-cpu", {"CUDA_VISIBLE_DEVICES": ""}, "--workers", str(bench.sizes.workers or 2),
        "--device", "cpu", "--precision", "fp32")))
    with contextlib.ExitStack() as stack:
        start = time.perf_counter()
        client = stack.enter_context(connect(workers=bench.sizes.workers, dashboard=False))
        workers = client.scheduler_info(n_workers=-1)["workers"]
        bench.row("cluster-start", seconds=time.perf_counter() - start, workers=len(workers),
                  cluster=type(getattr(client, "cluster", None)).__name__,
                  resources=sorted({r for w in workers.values() for r in w.get("resources", {})}))
        for key, precision in (("codes-gpu-fp16", "auto"), ("codes-gpu-fp32", "fp32")):
            bench.step([key], 30, lambda key=key, precision=precision: bench.row(
                key, **gpu_codes(bench, client, small, key, precision)))
        bench.step(["warm-resnet"], 30, lambda: bench.row("warm-resnet", **compress_api(
            bench, client, small, RESNET[0], "warm-resnet")))
        api_runs(bench, client, slides, "slide", 20)
        if big:
            ready = slide_path(bench, bench.sizes.big).exists()
            bench.step(["synth-big"], 40 if ready else 150, lambda: slides.update(big=resume_and_wait(bench, synth)))
            api_runs(bench, client, slides, "big", 40)


def gpu_codes(bench: Bench, client, small: Path, key: str, precision: str) -> dict:
    """The small slide on the cluster's worker, its codes compared with the CPU-only run's."""
    result = compress_api(bench, client, small, NIC[0], key, precision=precision)
    if "codes-cpu" in bench.results["rows"]:
        result.update(compare_codes(result["store"], bench.results["rows"]["codes-cpu"]["store"]))
    return result


def api_runs(bench: Bench, client, slides: dict, size: str, estimate: float) -> None:
    """Both encoders on one slide through the API (resnet50-trunc given twice the time)."""
    for encoder in (NIC[0], RESNET[0]):
        key = f"api-{encoder}-{size}"
        if size not in slides:
            bench.results["skipped"].setdefault(key, "skipped: no slide (see synth-big)")
            continue
        bench.step([key], estimate * (2 if encoder == RESNET[0] else 1), lambda key=key, encoder=encoder: bench.row(
            key, **compress_api(bench, client, slides[size], encoder, key)))


def stop(process) -> None:
    """End the background synthesis (also when stopped by SIGSTOP)."""
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


def resume_and_wait(bench: Bench, synth) -> Path:
    """The big slide: its synthesis, stopped during the measurements, goes on; the wait is recorded."""
    start = time.perf_counter()
    if synth is not None and synth.poll() is None:
        os.kill(synth.pid, signal.SIGCONT)
    path = wait_for(slide_path(bench, bench.sizes.big), synth, bench.left() - 130)  # room for its two runs
    bench.row("synth-big", waited_s=time.perf_counter() - start)
    return path


# ------------------------------------------------------------------------------ the run


def preset_rows(bench: Bench) -> None:
    """Each preset at fp16 and bf16 autocast with SDPA attention, random weights built on the GPU."""
    if bench.device != "cuda":  # the dry run has no GPU: these figures only mean something on one
        return
    bench.results["sdpa"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                             "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled()}
    for name in bench.args.presets.split(","):
        for precision in ("fp16", "bf16"):
            key = f"preset-{name}-{precision}"
            bench.step([key], 15, lambda key=key, name=name, precision=precision: bench.row(
                key, **vit_speed.preset_rate(name, PRESET_BATCH, precision, "cuda", bench.sizes.seconds / 2)))


def preset_table(results: dict) -> str:
    """The presets' rows as a Markdown table (empty when none was measured)."""
    rows = {k: v for k, v in results.get("rows", {}).items() if k.startswith("preset-")}
    if not rows:
        return ""
    lines = ["", "Foundation presets alone (random weights, autocast, SDPA attention, batch "
             f"{PRESET_BATCH}; `benchmarks/vit_speed.py`):", "",
             "| preset | network | input px | code dim | precision | patches/s |", "|---|---|---|---|---|---|"]
    for row in rows.values():
        lines.append(f"| {row['model']} | {row['architecture']} | {row['size']} | {row['code_dim']} | "
                     f"{row['precision']} | {row['rate']:,.0f} |")
    return "\n".join(lines) + "\n"


def run(bench: Bench) -> None:
    sizes, work = bench.sizes, bench.args.workdir
    machine(bench)
    if bench.args.presets_only:
        preset_rows(bench)
        return
    wanted = {"slide": sizes.slide, "small": sizes.small} | ({} if bench.args.no_big else {"big": sizes.big})
    todo = [(str(slide_path(bench, s)), *s) for s in wanted.values() if not slide_path(bench, s).exists()]
    todo.sort(key=lambda item: item[1] * item[2])  # small, slide, big: the measurements wait only for the first two
    synth = bench.synth = subprocess.Popen([sys.executable, str(PROBES), "synth", json.dumps({"slides": todo})],
                                           cwd=REPO) if todo else None
    bench.step(["tests"], 60, lambda: gpu_tests(bench, timeout=max(60.0, min(300.0, bench.left() - 240))))
    slide = wait_for(slide_path(bench, sizes.slide), synth, bench.left())
    small = wait_for(slide_path(bench, sizes.small), synth, bench.left())
    if synth is not None and synth.poll() is None:
        os.kill(synth.pid, signal.SIGSTOP)  # the big slide renders later: no core is taken from the measurements
    bench.results["slides"] = {k: list(v) for k, v in wanted.items()}
    bench.step(["tissue-cpu", "tissue-gpu"], 40, lambda: tissue_and_decode(bench, slide))
    for name, patch in (NIC, RESNET):
        for precision in ("fp16", "fp32"):
            key = f"encode-{name}-{precision}"
            bench.step([key], 10, lambda key=key, name=name, patch=patch, precision=precision: bench.row(
                key, **encode_rate(name, patch, precision, bench.device, sizes.seconds, sizes.max_batch)))
    slides = {"slide": slide, "small": small}
    bench.step(E2E_KEYS, 60, lambda: end_to_end(bench, slides, synth, "big" in wanted))
    stop(synth)
    for encoder in (NIC[0], RESNET[0]):
        key = f"command-{encoder}-slide"
        bench.step([key], 60, lambda key=key, encoder=encoder: bench.row(
            key, **compress_command(bench, slide, encoder, key)))
    for key in ("mask-cpu.npy", "mask-gpu.npy", "coverage.npy"):
        (work / key).unlink(missing_ok=True)
    preset_rows(bench)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny slides; docs/ untouched")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nic-gpu-bench"), help="slides (cached), stores, results")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 450)")
    parser.add_argument("--no-big", action="store_true", help="skip the 100,000 x 80,000 px slide")
    parser.add_argument("--presets", default=",".join(PRESETS), help="foundation presets to time, comma-separated")
    parser.add_argument("--presets-only", action="store_true", help="time only the foundation presets")
    args = parser.parse_args()
    if not args.dry_run and not gpu_count():
        print("no CUDA GPU here: benchmarks/gpu.py measures one (--dry-run runs its steps on the CPU)")
        sys.exit(2)
    bench = Bench(args, DRY if args.dry_run else FULL)
    try:
        run(bench)
    except KeyboardInterrupt:  # `timeout -s INT` in gpu-run.sh: keep what was measured
        bench.results["interrupted"] = True
    except Exception as err:  # e.g. no slide could be synthesized: the report still says what ran
        traceback.print_exc()
        bench.results["error"] = f"{type(err).__name__}: {err}"
    finally:
        stop(bench.synth)
    bench.save()
    if args.presets_only:  # a partial run: docs/ keep the full run's section; the table goes to $OUT
        for folder in bench.outs:
            (folder / "presets.md").write_text(preset_table(bench.results))
        print(preset_table(bench.results), flush=True)
        return
    section = gpu_report.render(bench.results).rstrip("\n") + "\n" + preset_table(bench.results)
    docs = REPO / "docs" / "benchmarks.md"
    text = gpu_report.replace_section(docs.read_text(), section)
    for folder in bench.outs:
        (folder / "benchmarks.md").write_text(text)
    if not args.dry_run:
        docs.write_text(text)
        (docs.parent / "benchmarks-gpu.json").write_text(json.dumps(bench.results, indent=1, default=str) + "\n")
    print(gpu_report.summary(bench.results), flush=True)


if __name__ == "__main__":
    main()
