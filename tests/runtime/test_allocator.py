"""Compression workers keep what they free: Dask's MALLOC_TRIM_THRESHOLD_ would otherwise make
every buffer over 128 KiB a fresh mapping, faulted in again at every batch."""

import os
import subprocess
import sys

import pytest

FAULTS = """
import resource, sys, numpy as np
from pipeline.runtime.cluster import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(3):  # warm up
    np.ones(4 * 1024 * 1024, np.uint8).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # a decoded band or an activation: allocated, written, freed, again
    np.ones(4 * 1024 * 1024, np.uint8).sum()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> tuple[str, int]:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}  # as Dask's nanny starts a worker
    env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env=env, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    _, plain = page_faults("plain")
    kept, tuned = page_faults("keep")
    assert kept == "True"
    assert plain > 50 * 500  # 4 MiB = 1024 pages, mapped afresh each time
    assert tuned < 500
