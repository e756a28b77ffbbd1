"""Patches/s of registered encoders on this CPU, side by side in one run (docs/encoders.md).

    nice python benchmarks/encoder_speed.py nic-mtl-v1 nic-mtl-v3 nic-mtl-v3-fast --threads 1 --threads 2

Each encoder runs through the pipeline's one encoder runner (``codes.encode_patches``, the
function ``nic compress`` and ``nic embed`` call) on random uint8 patches of its own size, in
batches of 256, at ``--precision`` (``fp32`` by default: this is the number to compare across
CPUs; ``auto`` is what the hardware policy picks). One warm-up batch, then repeated batches for
at least ``--seconds``. The CPU, its SIMD flags and the load average before and after are
printed with every figure: on a shared machine a figure without its load means little.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from vit_speed import cpu_facts  # noqa: E402

from nic_models.registry import create_encoder  # noqa: E402
from nic_pipeline.compress.codes import encode_patches  # noqa: E402


def patches_per_second(name: str, threads: int, precision: str, seconds: float, batch: int = 256) -> dict:
    """Throughput of one encoder at one thread count."""
    torch.set_num_threads(threads)
    encoder = create_encoder(name)
    size = encoder.spec.patch_size
    patches = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    encode_patches(encoder, patches[:32], precision)  # warm-up
    load_before, done, start = os.getloadavg()[0], 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encode_patches(encoder, patches, precision, batch_size=batch)
        done += batch
    elapsed = time.perf_counter() - start
    return {"encoder": name, "patch_px": size, "mpp": encoder.spec.mpp, "threads": threads,
            "precision": precision, "patches_per_s": round(done / elapsed, 1),
            "ms_per_patch_per_thread": round(1000 * elapsed * threads / done, 2),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoders", nargs="+", help="registry names, aliases or card paths")
    parser.add_argument("--threads", type=int, action="append", default=None)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args(argv)
    facts = cpu_facts()
    print(f"CPU: {facts['cpu']} ({facts['logical_cpus']} logical CPUs, {', '.join(facts['flags'])}); "
          f"torch {facts['torch']}", flush=True)
    rows = []
    for threads in args.threads or [1]:
        for name in args.encoders:
            row = patches_per_second(name, threads, args.precision, args.seconds)
            rows.append(row)
            print(f"{name:<32} {row['patch_px']:>4} px  {threads} thread(s)  {row['precision']}  "
                  f"{row['patches_per_s']:>8.1f} patches/s  {row['ms_per_patch_per_thread']:>6.2f} ms/patch/thread  "
                  f"load {row['load_before']} -> {row['load_after']}", flush=True)
    if args.out_json:
        args.out_json.write_text(json.dumps({"cpu": facts, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
