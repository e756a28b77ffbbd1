"""The "GPU" section of docs/benchmarks.md, written from benchmarks/gpu.py's results: what is
measured and how to run it, then one table per step. A row the run did not reach says why;
before any run every figure reads "not yet measured".
"""

from __future__ import annotations

from gpu_wheels import WHEELS

TITLE = "## GPU"
NOT_YET = "not yet measured"
TARGETS = {"nic": 5.0, "resnet50-trunc": 30.0}  # seconds, file to Zarr, big slide, one H100 (issue 14)

METHOD = """\
`benchmarks/gpu.py` measures the GPU path on one GPU in one run of under 8 minutes (issue 14).
Every step runs against a time budget (450 s; a step that no longer fits is skipped and says so)
and apart from the others (one that fails is recorded and the run goes on).

- **Slides**: synthetic 40x-like slides (`write_synthetic_slide`, 0.25 µm/px, JPEG q90 tiles of
  256 px, pyramid 1, 4, 16, ...): 50,000 x 40,000 px, 100,000 x 80,000 px (the issue's target)
  and 4,096 x 4,096 px for the codes. They render on every core while the tests run; the big one
  is paused during the measurements and finished before its own runs. Cached in the work folder.
- **Tests**: `python -m pytest -m gpu -q tests`.
- **Decode**: the tissue cells of the NIC grid (128 px at 0.5 µm/px, at least 10 % tissue), read
  as a worker reads them (`iter_bands`: one region per band of 512 px, level 0 decoded and
  averaged 2 x 2 to 0.5 µm/px, cells gathered on the reader's device). CPU: cuCIM's cuslide
  (libjpeg-turbo), one thread per core on blocks of 32 x 32 cells. GPU: one thread on blocks of
  256 x 256 cells, as one GPU worker runs: cuslide with `device="cuda"`, and cuslide2 with
  nvImageCodec, with and without the corrupt-tile check (docs/slides.md). Each reader runs in a
  fresh process (cuCIM picks its decoder once per process); "decoder" is what the reader reported.
- **Tissue**: `slide_tissue_mask` at 8 µm/px, NumPy on the CPU and CuPy on the GPU; the second
  call is timed (the first, which compiles the GPU kernels, is shown apart); the rate counts the
  cells of the NIC grid; agreement is the share of mask pixels equal to the CPU's.
- **Encoder alone**: random uint8 patches already on the GPU, at the workers' batch size
  (256 x 128 px for NIC, 64 x 224 px for resnet50-trunc), fp16 autocast and fp32.
- **End to end**, file to Zarr: `nic_pipeline.api.compress` on a warm embedded cluster (dask-cuda's
  LocalCUDACluster, one worker; each encoder loaded by a small slide first), the cluster's start
  timed apart; and `nic compress` as a command in a fresh process (wall time: Python, cluster
  start, encoder load and compression; "seconds" is the run's own closing line).
  resnet50-trunc needs a local weights file: its timings use `--random-init` (the same network
  with seeded random weights; its speed does not depend on them).
- **Codes**: the small slide compressed on the GPU worker (fp16, as `auto` picks there, and fp32)
  against a CPU-only run (`CUDA_VISIBLE_DEVICES=`, fp32, cuCIM's CPU decoder), over the cells
  both encoded (cells that only one tissue mask kept are counted apart): max abs difference,
  relative difference ‖gpu − cpu‖ / ‖cpu‖, and whether every code agrees within
  rtol = atol = 0.02 (the tolerance of the `gpu` test of compression).
"""


def how_to_run() -> str:
    """The recipe for a session lent a GPU, with the wheel list from benchmarks/gpu_wheels.py."""
    wheels = "\n".join(f"- {name}=={version}" for name, version in WHEELS.items())
    return f"""\
### How to run it

Only where the task was lent a GPU machine (the device tool's `status` says `can_start_another`).
In the checkout's root, on the development machine:

```bash
python benchmarks/gpu_wheels.py     # fetches and slims the wheels into .whl/ (git-ignored), checks the 64 MiB
```

Then one call of the device tool's `run`: command `bash benchmarks/gpu-run.sh`, carry `[".whl"]`,
timeout_s 600. It installs the wheels into /tmp/site (the device README's recipe), runs
`python3 benchmarks/gpu.py` and leaves `log`, `gpu-benchmark.json`, `pytest-gpu.txt` and the
updated `benchmarks.md` in `$OUT`: copy `benchmarks.md` over docs/benchmarks.md and
`gpu-benchmark.json` to docs/benchmarks-gpu.json, and commit them. `python benchmarks/gpu.py
--dry-run` runs every step on the CPU with tiny slides and writes nothing into docs/
(tests/test_gpu_benchmark.py runs it).

Wheels carried (CPython 3.12, x86-64; the machine has PyTorch, CuPy, NumPy, SciPy, scikit-image,
pandas, tifffile, xarray, timm, safetensors, psutil, msgpack, cloudpickle, nvidia-ml-py,
cuda-core):

{wheels}

cuCIM 26.06 is the last release built for nvImageCodec 0.8: 26.08 needs 0.9, whose GPU JPEG
region decoding fails (NVIDIA/nvImageCodec#55). nvidia-nvjpeg brings the libnvjpeg.so.13 that
nvImageCodec's GPU JPEG decoder loads; Dask is at the version dask-cuda 26.10 is released for.
To fit 64 MiB with the working tree, gpu_wheels.py cuts what nothing here uses out of three
wheels: cuCIM's test data, nvImageCodec's modules for other Pythons and its OpenCV, nvJPEG2000
and nvTIFF codecs (their libraries do not travel), and imagecodecs' codecs other than JPEG, PNG, deflate, zlib and zstd.
"""


def value(results: dict | None, key: str, show, missing: str | None = None) -> str:
    """``show(row)`` for a measured row; else ``missing`` (secondary columns), or why it is missing."""
    if results and key in results.get("rows", {}):
        return show(results["rows"][key])
    if missing is not None:
        return missing
    if results and key in results.get("skipped", {}):
        return results["skipped"][key]
    return NOT_YET


def rate(row) -> str:
    return f"{row['rate']:,.0f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), ""]


def machine_line(results: dict | None) -> str:
    if not results or "machine" not in results:
        return f"Card: {NOT_YET}."
    m = results["machine"]
    gpu = (f"{m['card']} (compute capability {m['capability']}, {m['gpu_memory_gib']} GiB, driver CUDA "
           f"{m['driver_cuda']})" if "capability" in m else m["card"])
    soft = ", ".join(f"{k} {m.get(k)}" for k in SOFTWARE)
    stopped = (" The run was cut short by its time limit." if results.get("interrupted") else
               f" The run stopped: {results['error']}." if results.get("error") else "")
    return (f"Card: **{gpu}**; {m['cpus']} CPU cores; Python {m['python']}, torch CUDA {m['torch_cuda']}; {soft}. "
            f"Measured {results.get('date')} in {results.get('seconds', 0):.0f} s"
            f"{' (dry run on the CPU: not GPU figures)' if results.get('dry_run') else ''}.{stopped}")


SOFTWARE = ("torch", "cupy", "cucim", "nvimgcodec", "dask", "distributed", "dask_cuda", "zarr")
DEFAULT_SIZES = {"slide": "50,000 x 40,000", "big": "100,000 x 80,000", "small": "4,096 x 4,096"}


def size_label(results: dict | None, which: str) -> str:
    size = (results or {}).get("slides", {}).get(which)
    return f"{size[0]:,} x {size[1]:,}" if size else DEFAULT_SIZES[which]


def targets(r: dict | None) -> list[str]:
    rows = []
    for encoder, limit in TARGETS.items():
        key = f"api-{encoder}-big"
        rows.append([f"{encoder}, file to Zarr, warm worker", size_label(r, "big"), f"≤ {limit:g} s",
                     value(r, key, lambda x: f"{x['seconds']:.1f} s ({x['patches']:,} patches)"),
                     value(r, key, lambda x, limit=limit: "yes" if x["seconds"] <= limit else "no", "-")])
    rows.append(["GPU (fp16) vs CPU (fp32) codes", size_label(r, "small"), "rtol = atol = 0.02",
                 value(r, "codes-gpu-fp16", lambda x: f"max abs {x['max_abs']:.4f}, relative {x['relative']:.2e}"),
                 value(r, "codes-gpu-fp16", lambda x: "yes" if x["within_tolerance"] else "no", "-")])
    return table(["target", "slide (px)", "target", "measured", "met"], rows)


DECODERS = (("decode-cpu", "CPU, cuCIM cuslide", "a thread per core, 32-cell blocks"),
            ("decode-gpu-cuslide", "GPU, cuCIM cuslide, device=cuda", "1 thread, 256-cell blocks"),
            ("decode-gpu-nvimgcodec", "GPU, cuCIM cuslide2 (nvImageCodec)", "1 thread, 256-cell blocks"),
            ("decode-gpu-nvimgcodec-nocheck", "same, no corrupt-tile check", "1 thread, 256-cell blocks"))
E2E = (("API, warm worker", "api-nic-slide", "nic", "slide"),
       ("API, warm worker", "api-resnet50-trunc-slide", "resnet50-trunc", "slide"),
       ("API, warm worker", "api-nic-big", "nic", "big"),
       ("API, warm worker", "api-resnet50-trunc-big", "resnet50-trunc", "big"),
       ("`nic compress` command", "command-nic-slide", "nic", "slide"),
       ("`nic compress` command", "command-resnet50-trunc-slide", "resnet50-trunc", "slide"))


def e2e_rows(r: dict | None) -> list[list[str]]:
    start = value(r, "cluster-start", lambda x: f"{x['seconds']:.1f}")
    rows = [[value(r, "cluster-start", lambda x: f"cluster start ({x['cluster']}, {x['workers']} worker(s))",
                   "cluster start"), "-", "-", "-", start, "-", "-"]]
    for how, key, encoder, which in E2E:
        rows.append([how, encoder, size_label(r, which), value(r, key, lambda x: f"{x['patches']:,}", "-"),
                     value(r, key, lambda x: f"{x['seconds']:.1f}" + (f" ({x['wall_s']:.1f} wall)" if "wall_s" in x else ""),
                           "-"),
                     value(r, key, rate), value(r, key, lambda x: ", ".join(x["decoders"] + x["precisions"]), "-")])
    return rows


def render(results: dict | None) -> str:
    """The whole section, method first."""
    r = results
    tests = value(r, "tests", lambda t: f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped, "
                                        f"{t['error']} errors (exit {t['exit_code']}, {t['seconds']:.0f} s)")
    decode = [[label, value(r, key, lambda x: x["decoder"], "-"),
               value(r, key, lambda x: f"{x['threads']} thread(s), {x['block']}-cell blocks", setting),
               value(r, key, rate)] for key, label, setting in DECODERS]
    tissue = [[device, value(r, key, lambda x: f"{x['seconds']:.3f}", "-"),
               value(r, key, lambda x: f"{x['first_s']:.3f}", "-"), value(r, key, rate),
               value(r, key, lambda x: f"{x['agreement']:.4f}" if "agreement" in x else "reference", "-")]
              for key, device in (("tissue-cpu", "CPU (NumPy)"), ("tissue-gpu", "GPU (CuPy)"))]
    encode = [[name, precision, value(r, f"encode-{name}-{precision}", lambda x: str(x["batch"]), "-"),
               value(r, f"encode-{name}-{precision}", rate)]
              for name in ("nic", "resnet50-trunc") for precision in ("fp16", "fp32")]
    codes = [[label, value(r, key, lambda x: f"{x['cells']:,} (+{x['cells_in_one_only']} in one store only)", "-"), value(r, key, lambda x: f"{x['max_abs']:.4f}", "-"),
              value(r, key, lambda x: f"{x['relative']:.2e}"), value(r, key, lambda x: f"{x['max_code']:.2f}", "-"),
              value(r, key, lambda x: "yes" if x["within_tolerance"] else "no", "-")]
             for key, label in (("codes-gpu-fp16", "GPU fp16 vs CPU fp32"), ("codes-gpu-fp32", "GPU fp32 vs CPU fp32"))]
    lines = [TITLE, "", METHOD, how_to_run(), "### Results", "", machine_line(r), "", "Targets (issue 14):", "",
             *targets(r), f"`gpu` tests: {tests}.", "", f"Decode, patches/s (slide {size_label(r, 'slide')} px):", "",
             *table(["reader", "decoder", "setting", "patches/s"], decode),
             f"Tissue detection (slide {size_label(r, 'slide')} px):", "",
             *table(["device", "seconds", "first call (s)", "NIC cells/s", "agreement"], tissue),
             "Encoder alone (inputs already on the device):", "",
             *table(["encoder", "precision", "batch", "patches/s"], encode),
             "End to end, file to Zarr:", "",
             *table(["how", "encoder", "slide (px)", "patches", "seconds", "patches/s", "decoder, precision"], e2e_rows(r)),
             f"Codes of the {size_label(r, 'small')} px slide, GPU worker vs CPU-only run:", "",
             *table(["comparison", "cells", "max abs diff", "relative diff", "max abs code", "within 0.02"], codes)]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    """``text`` with its GPU section replaced by ``section`` (appended when absent)."""
    start = text.find(f"\n{TITLE}\n")
    if start < 0:
        return text.rstrip() + "\n\n" + section.rstrip() + "\n"
    end = text.find("\n## ", start + 1)
    return text[:start + 1] + section.rstrip() + "\n" + (text[end:] if end >= 0 else "")


def summary(results: dict) -> str:
    """The short table printed last (the device tool's reply shows the end of the output)."""
    lines = [f"{'row':<32} figure"]
    for key, row in results.get("rows", {}).items():
        figure = (f"{row['passed']} passed, {row['failed']} failed, {row['skipped']} skipped, {row['error']} errors"
                  if key == "tests"
                  else f"{row['rate']:,.0f} /s" if "rate" in row else f"{row['seconds']:.1f} s" if "seconds" in row
                  else f"waited {row['waited_s']:.0f} s" if "waited_s" in row else "")
        lines.append(f"{key:<32} {figure}")
    lines += [f"{key:<32} {why}" for key, why in results.get("skipped", {}).items()]
    return "\n".join(lines)
