"""Benchmark `nic compress` against the physical floor of its two stages.

    python benchmarks/compress.py [--size 24000] [--big 48000] [--workdir /tmp/nic-bench]
    python benchmarks/compress.py --cli native avx2 [--cli-sizes 24000 48000] [--cli-copies 1 4] [--cli-blocks 0]   # the whole command

On one synthetic slide at 0.5 µm/px with about 40% tissue it measures, in one run:

* end-to-end patches/s of the compression graph on the embedded cluster (warm workers);
* the decode floor: the same tissue patches read and decoded, nothing else, the fastest way we
  know (cuCIM batched reads of tile-aligned regions, and tifffile + imagecodecs raw tiles);
* the encoder floor: the encoder alone on random batches in its fastest setting;
* the floor: on CPU both stages share the cores, so 1 / (1/decode + 1/encode); on a GPU, where
  they overlap, the smaller of the two;
* the cost of ``--dihedral-mean`` (codes averaged over the 8 rotations/flips): row ``nic+dihedral``;
* a worker's peak memory, on this slide and on a slide twice as wide and high.

With ``--cli`` it times the whole ``nic compress`` command instead, cold (Python start, cluster
start, model load, until the process exits), and divides its rate by the floor that the policy
allows: ``native`` (fp32 or bf16, whichever is faster) and ``avx2`` (fp32 only, workers told
``NIC_CPU_BF16=0``); a second, traced run says where the time goes.

Results go to docs/benchmarks.md (sections "Compression" and "Compression: the whole command").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_slide(path: Path, size: int) -> Path:
    from nic_pipeline.synth import write_synthetic_slide

    if not path.exists():
        start = time.perf_counter()
        write_synthetic_slide(path, size, size, mpp=0.5, seed=7)
        print(f"synthesized {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def tissue_cells(slide_path: Path, patch: int, min_tissue: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The level-0 origins of the tissue cells, as the compression graph selects them."""
    from nic_pipeline.compress.grid import Grid
    from nic_pipeline.io import open_slide
    from nic_pipeline.compress.grid import cell_coverage
    from nic_pipeline.compress.tissue import slide_tissue_mask

    with open_slide(slide_path) as slide:
        grid = Grid(*slide.dimensions, slide.require_mpp(), 0.5, patch, patch)
        mask, mask_mpp = slide_tissue_mask(slide, mask_mpp=8.0)
    tissue = cell_coverage(mask, mask_mpp, grid.cell_um, grid.shape)
    rows, cols = np.nonzero(tissue >= min_tissue)
    print(f"grid {grid.shape}, {len(rows)} tissue cells ({len(rows) / tissue.size:.0%})", flush=True)
    return grid.cell_origin_px(rows, cols)


def decode_floor_cucim(slide_path: Path, xs, ys, patch: int) -> float:
    """Patches/s: cuCIM batched reads of exactly the tissue patches, decoded on every core."""
    from cucim import CuImage

    image = CuImage(str(slide_path))
    locations = [(int(x), int(y)) for x, y in zip(xs, ys)]
    start = time.perf_counter()
    for region in image.read_region(locations, (patch, patch), 0, num_workers=os.cpu_count(), batch_size=64):
        np.asarray(region)
    return len(xs) / (time.perf_counter() - start)


def decode_floor_tifffile(slide_path: Path, xs, ys, patch: int) -> float:
    """Patches/s: the raw JPEG tiles under the tissue patches, decoded by imagecodecs on every core."""
    import tifffile
    from concurrent.futures import ThreadPoolExecutor

    import imagecodecs

    with tifffile.TiffFile(slide_path) as tif:
        page = tif.pages[0]
        tile_w, tile_h = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tile_w)
        wanted = sorted({(int(y) // tile_h + dy, int(x) // tile_w + dx)
                         for x, y in zip(xs, ys) for dy in range(-(-patch // tile_h)) for dx in range(-(-patch // tile_w))})
        fh = tif.filehandle
        tables = page.jpegtables
        raw = []
        for ty, tx in wanted:
            index = ty * across + tx
            fh.seek(page.dataoffsets[index])
            raw.append(fh.read(page.databytecounts[index]))
    start = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda data: imagecodecs.jpeg_decode(data, tables=tables), raw))
    return len(xs) / (time.perf_counter() - start)


ENCODER_PROBE = """
import json, sys, time, torch
from nic_pipeline.runtime.process import keep_freed_memory
keep_freed_memory()  # the workers' allocator settings (NicWorker.setup)
from nic_pipeline.compress.codes import build_encoder, encode_patches
from nic_pipeline.compress.encode import EncoderSettings
name, patch, threads, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
precisions = sys.argv[5].split(",")
torch.set_num_threads(threads)
enc = build_encoder(EncoderSettings(name, random_init=True), "cpu")
x = torch.randint(0, 256, (256, patch, patch, 3), dtype=torch.uint8).numpy()
out = {}
for precision in precisions:
    encode_patches(enc, x[:32], precision, 32)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        encode_patches(enc, x, precision, 256 if patch <= 128 else 64); n += len(x)
    out[precision] = n / (time.perf_counter() - start)
    out[precision + " per CPU-s"] = n / (time.process_time() - cpu)
print(json.dumps(out))
"""


def fastest(rates: dict) -> float:
    """The best patches/s among a floor's settings (entries per CPU-second left out)."""
    return max(v for k, v in rates.items() if not k.endswith("per CPU-s"))


def encoder_floor(name: str, patch: int, seconds: float = 12.0, precisions=("fp32", "bf16")) -> dict:
    """Patches/s of the encoder alone on random uint8 batches in each of ``precisions`` (channels-last),
    in fresh processes with the workers' allocator (tcmalloc preloaded when installed, glibc
    keeping freed memory as ``NicWorker.setup`` makes it): one process using every
    core, and one single-threaded process per core side by side (rates added). The best of the
    settings is the floor. Entries "<precision> per CPU-s" give patches per CPU-second (mean over
    the processes): a cost that the load of a shared machine moves much less than the rate."""
    from nic_pipeline.runtime.cluster import _worker_environment

    env = {**os.environ, **_worker_environment(), "PYTHONPATH": str(REPO)}
    cores = os.cpu_count() or 1

    def run(processes: int, threads: int) -> dict:
        procs = [subprocess.Popen([sys.executable, "-c", ENCODER_PROBE, name, str(patch), str(threads), str(seconds),
                                   ",".join(precisions)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
                 for _ in range(processes)]
        rates = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        return {k: (sum if k in precisions else np.mean)([r[k] for r in rates]) for k in rates[0]}

    results = {f"1x{cores} {k}": v for k, v in run(1, cores).items()}
    if cores > 1:
        results.update({f"{cores}x1 {k}": v for k, v in run(cores, 1).items()})
    print(f"encoder floor {name}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in results.items()), flush=True)
    return results


def end_to_end(slide_path: Path, store: Path, encoder: str, client) -> dict:
    """Patches/s of the compression graph on warm workers, and each worker's peak RSS."""
    import shutil

    from nic_pipeline.compress.graph import compress
    from nic_pipeline.compress.jobs import plan_jobs
    from nic_pipeline.compress.encode import EncoderSettings

    shutil.rmtree(store, ignore_errors=True)
    settings = EncoderSettings(encoder, random_init=not encoder.startswith("nic"), precision="auto")
    warm_up = store.parent / "warm-up"  # loads the encoder on every worker, as a previous job would
    make_slide(warm_up / "warm_up.tif", 2048)
    shutil.rmtree(warm_up / "warm-up.zarr", ignore_errors=True)
    compress(plan_jobs([warm_up / "warm_up.tif"]), warm_up / "warm-up.zarr", client, settings, progress=False)
    start = time.perf_counter()
    report = compress(plan_jobs([slide_path]), store, client, settings, progress=False)
    elapsed = time.perf_counter() - start
    peak = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    assert report.slides[0].status == "complete", report.slides[0].error
    return {"patches": report.patches, "seconds": elapsed, "rate": report.patches / elapsed,
            "worker_peak_mb": max(peak.values())}


def machine() -> str:
    """The CPU (with whether it computes bf16 natively), memory, OS and GPUs of this machine."""
    from nic_pipeline.runtime.device import NATIVE_BF16_FLAGS, cpu_flags, gpu_count

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    native = sorted(cpu_flags() & NATIVE_BF16_FLAGS)
    bf16 = f"native bf16: {', '.join(native)}" if native else "no native bf16 (no avx512_bf16/amx_bf16)"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = gpu_count()
    return (f"{os.cpu_count()} cores ({cpu}; {bf16}), {mem:.0f} GiB, {platform.system()} {platform.machine()}, "
            f"{f'{gpus} GPU(s)' if gpus else 'no GPU'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=24000)
    parser.add_argument("--big", type=int, default=48000, help="second slide for the memory comparison (0: skip)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nic-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--cli", nargs="+", choices=["native", "avx2"], default=None,
                        help="time the whole `nic compress` command under these policies instead")
    parser.add_argument("--cli-blocks", nargs="+", type=int, default=[0],
                        help="--block values for the command (0: the CLI's default)")
    parser.add_argument("--cli-sizes", nargs="+", type=int, default=[24000, 48000],
                        help="slide sides (px) the command is timed on")
    parser.add_argument("--cli-warm", action="store_true",
                        help="with --cli: also time the command on a warm cluster (nic cluster start)")
    parser.add_argument("--cli-copies", nargs="+", type=int, default=[1],
                        help="inputs of N copies of each slide (a cohort; 1: the slide alone)")
    parser.add_argument("--floor-seconds", type=float, default=6.0, help="length of each encoder probe with --cli")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.cli:
        from benchmarks.whole_command import whole_command

        whole_command(args)
        return

    from nic_pipeline.runtime.cluster import connect, tcmalloc_path

    slide = make_slide(args.workdir / f"bench_{args.size}.tif", args.size)
    rows = []
    with connect(dashboard=False) as client:
        for encoder, patch in (("nic", 128), ("nic+dihedral", 128), ("resnet50-trunc", 224)):
            xs, ys = tissue_cells(slide, patch)
            decoders = {"cuCIM batched read_region": decode_floor_cucim(slide, xs, ys, patch),
                        "tifffile + imagecodecs raw tiles": decode_floor_tifffile(slide, xs, ys, patch)}
            encoders = encoder_floor(encoder, patch)
            decode, encode = max(decoders.values()), fastest(encoders)
            floor = 1 / (1 / decode + 1 / encode)
            e2e = end_to_end(slide, args.workdir / f"{encoder}.zarr", encoder, client)
            rows.append((encoder, patch, decode, encode, floor, e2e, decoders, encoders))
            print(rows[-1], flush=True)
        memory = [(args.size, rows[0][5]["worker_peak_mb"])]
    if args.big:
        big = make_slide(args.workdir / f"bench_{args.big}.tif", args.big)
        with connect(dashboard=False) as client:  # fresh workers: their peak is this slide's alone
            memory.append((args.big, end_to_end(big, args.workdir / "big.zarr", "nic", client)["worker_peak_mb"]))
    write_report(args.out, rows, memory, args.size, tcmalloc_path() is not None)


def write_report(path: Path, rows, memory, size: int, tcmalloc: bool) -> None:
    lines = [
        "## Compression",
        "",
        f"Measured by `python benchmarks/compress.py` on {machine()}; "
        f"tcmalloc preloaded in workers: {'yes' if tcmalloc else 'no'}. One synthetic slide of "
        f"{size:,} x {size:,} px at 0.5 µm/px; embedded cluster of {os.cpu_count()} single-threaded "
        "CPU workers, precision auto, warm workers (cluster start not counted).",
        "",
        "| encoder | patch px | decode floor (patches/s) | encoder floor (patches/s) | floor 1/(1/d+1/e) | end-to-end (patches/s) | end-to-end / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for encoder, patch, decode, encode, floor, e2e, _, _ in rows:
        lines.append(f"| {encoder} | {patch} | {decode:,.0f} | {encode:,.0f} | {floor:,.0f} | "
                     f"{e2e['rate']:,.0f} ({e2e['patches']:,} patches in {e2e['seconds']:.0f} s) | "
                     f"{e2e['rate'] / floor:.0%} |")
    lines += ["", "Each floor is the best of the ways we tried (patches/s):", ""]
    for encoder, _, _, _, _, _, decoders, encoders in rows:
        details = {**decoders, **{f"encoder {k}": v for k, v in encoders.items()}}
        lines.append(f"- {encoder}: " + "; ".join(f"{k} {v:,.0f}" for k, v in details.items()))
    lines += ["", "Peak resident memory of one worker (NIC encoder):", "", "| slide side (px) | worker peak RSS (MB) |",
              "|---|---|"]
    lines += [f"| {side:,} | {mb:,.0f} |" for side, mb in memory]
    replace_section(path, "## Compression", "\n".join(lines) + "\n")


GENERATED_END = "<!-- end of generated figures -->"


def replace_section(path: Path, heading: str, section: str) -> None:
    """Put ``section`` (starting with ``heading``) into the markdown file at ``path``: it replaces the
    old section's generated part (up to :data:`GENERATED_END`, so the prose after it stays) or, without
    the marker, the whole old section; a new section goes at the end."""
    section = section.rstrip("\n") + "\n\n" + GENERATED_END + "\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        end = len(text) if end < 0 else end + 1
        marker = text.find(GENERATED_END, start, end)
        end = marker + len(GENERATED_END) + 1 if marker >= 0 else end
        text = text[:start] + section + text[end:]
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
