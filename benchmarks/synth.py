"""Benchmark and pictures for `nic synth` (pipeline/synth/).

    python benchmarks/synth.py bench [--size 30000]   # time + peak RSS of one slide -> docs/benchmarks.md
    python benchmarks/synth.py thumbnails             # docs/img/synth_*.png used by docs/synth.md

`bench` runs the real command (`nic synth`) in a child process and reads its peak resident
memory from ``resource.getrusage(RUSAGE_CHILDREN)`` after it exits, so the figure covers the
whole process (Python, NumPy, tifffile, JPEG buffers). It rewrites only the
"## Synthetic slides" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.segmentation import find_boundaries

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nic_pipeline import synth  # noqa: E402

DOCS = REPO / "docs"
SECTION = "## Synthetic slides"
KATHER = REPO.parent / "shared" / "data" / "tiles" / "kather2016_samples"


def machine() -> str:
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return f"{os.cpu_count()} cores {platform.machine()}, {mem_gib:.0f} GiB RAM, no GPU, Python {platform.python_version()}"


def bench(size: int, seed: int) -> dict:
    """Run `nic synth` for one positive size x size slide; return wall s, CPU s, peak RSS, file size."""
    with tempfile.TemporaryDirectory(prefix="nic-synth-bench-") as tmp:
        cmd = [sys.executable, "-c", "from nic_pipeline.cli import main; main()", "synth", tmp, "--slides", "1", "--width", str(size),
               "--height", str(size), "--positive-fraction", "1", "--lesion-fraction", "0.05",
               "--seed", str(seed)]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        tif = Path(tmp) / "synth_000.tif"
        with tifffile.TiffFile(tif) as t:
            levels = [p.shape[:2] for p in t.pages]
            tiles = sum(len(p.dataoffsets) for p in t.pages)
        return {
            "size": size, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024, "file_mib": tif.stat().st_size / 2**20,
            "levels": levels, "tiles": tiles, "load_before": load,
        }


def write_section(result: dict) -> Path:
    """Replace (or append) the synthetic-slides section of docs/benchmarks.md."""
    r = result
    levels = ", ".join(f"{w}x{h}" for h, w in r["levels"])
    body = f"""{SECTION}

`nic synth OUT --slides 1 --width {r['size']} --height {r['size']} --positive-fraction 1 --lesion-fraction 0.05`
(procedural texture, 2 rendering threads), measured by `python benchmarks/synth.py bench`
on {machine()}; load average before the run {r['load_before']:.1f} (teammates share the 2 cores,
so wall time is an upper bound; CPU time is the work done).

| slide | levels | tiles | wall time | CPU time (user+sys) | peak RSS | file |
|---|---|---|---|---|---|---|
| {r['size']:,} x {r['size']:,} px @ 0.5 µm/px | {levels} | {r['tiles']:,} | {r['wall_s']:.0f} s | {r['cpu_s']:.0f} s | {r['peak_rss_mib']:.0f} MiB | {r['file_mib']:.0f} MiB |

Peak RSS is the whole `nic synth` process (`getrusage(RUSAGE_CHILDREN).ru_maxrss`). Memory does
not grow with the slide: tiles are rendered by 2 threads (at most 4 in flight) and JPEG-encoded
one at a time,
and only the low-resolution fields (one value per 32 x 32 px, {-(-r['size'] // 32)}² per field) are kept.
"""
    path = DOCS / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(body.rstrip("\n") + "\n\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _overlay(thumb, lesion):
    """Thumbnail with the lesion outline in bright green."""
    up = np.asarray(Image.fromarray(lesion.astype(np.uint8) * 255).resize(
        (thumb.shape[1], thumb.shape[0]), Image.Resampling.NEAREST)) > 127
    edge = find_boundaries(up, mode="thick")
    edge = ndimage.binary_dilation(edge, iterations=1)
    out = thumb.copy()
    out[edge] = (0, 200, 0)
    return out


def _panel(truth, close_up_px=768, thumb_px=480):
    """[thumbnail with lesion outline | lesion mask | level-0 lesion close-up | level-0 normal close-up]."""
    with openslide.OpenSlide(str(truth.path)) as slide:
        thumb = np.asarray(slide.get_thumbnail((thumb_px, thumb_px)).convert("RGB"))
        ds = truth.mask_downsample
        crops = []
        for mask in (truth.lesion_mask, truth.tissue_mask & ~truth.lesion_mask & ~truth.pen_mask):
            inner = ndimage.binary_erosion(mask, iterations=4)
            ys, xs = np.nonzero(inner if inner.any() else mask)
            i = len(ys) // 2
            cy, cx = int(ys[i] * ds), int(xs[i] * ds)
            crop = slide.read_region((cx - close_up_px // 2, cy - close_up_px // 2), 0, (close_up_px, close_up_px))
            crops.append(np.asarray(crop.convert("RGB").resize((thumb.shape[0], thumb.shape[0]))))
    mask = np.asarray(Image.fromarray(truth.lesion_mask.astype(np.uint8) * 255).resize(
        (thumb.shape[1], thumb.shape[0]), Image.Resampling.NEAREST))
    tissue = np.asarray(Image.fromarray(truth.tissue_mask.astype(np.uint8) * 255).resize(
        (thumb.shape[1], thumb.shape[0]), Image.Resampling.NEAREST))
    mask_rgb = np.stack([np.where(mask > 127, 255, np.where(tissue > 127, 120, 0))] * 3, -1).astype(np.uint8)
    gap = np.full((thumb.shape[0], 8, 3), 255, np.uint8)
    return np.concatenate([_overlay(thumb, truth.lesion_mask), gap, mask_rgb, gap, crops[0], gap, crops[1]], axis=1)


def thumbnails(out_dir: Path) -> list[Path]:
    """One procedural slide and one kather2016-tiles slide, each as a 4-panel PNG."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="nic-synth-thumbs-") as tmp:
        jobs = [("synth_synthetic.png", dict(texture="synthetic", pen_marks=True))]
        if KATHER.is_dir():
            jobs.append(("synth_tiles_kather2016.png", dict(texture=f"tiles:{KATHER}")))
        for name, kwargs in jobs:
            truth = synth.write_synthetic_slide(Path(tmp) / "s.tif", 12_000, 9_000, seed=4,
                                                lesion_fraction=0.05, **kwargs)
            Image.fromarray(_panel(truth)).save(out_dir / name, optimize=True)
            print(f"{name}: lesion fraction {truth.lesion_fraction:.4f}", flush=True)
            written.append(out_dir / name)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--size", type=int, default=30_000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    sub.add_parser("thumbnails")
    args = parser.parse_args(argv)
    if args.what == "bench":
        result = bench(args.size, args.seed)
        print(result)
        if not args.no_write:
            print("wrote", write_section(result))
    else:
        for p in thumbnails(DOCS / "img"):
            print("wrote", p)


if __name__ == "__main__":
    main()
