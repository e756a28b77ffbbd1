"""pipeline/runtime/process.py: worker processes keep what they free (Dask's MALLOC_TRIM_THRESHOLD_
would make every buffer over 128 KiB a fresh mapping, faulted in again at every batch), and
build ASTs one thread at a time (CPython's shared AST recursion counter, gh-106905)."""

import os
import subprocess
import sys

import pytest

FAULTS = """
import resource, sys, numpy as np
from nic_pipeline.runtime.process import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(3):  # warm up
    np.ones(1024 * 1024, np.uint8).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# a decoded band or an activation: allocated, written, freed, again (1 MiB: below NumPy's 4 MiB
# huge-page advice and a 2 MiB huge page, so each fresh mapping faults in its 256 pages)
for _ in range(50):
    np.ones(1024 * 1024, np.uint8).sum()
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
    assert plain > 50 * 200  # 1 MiB = 256 pages, mapped afresh each time
    assert tuned < 500


AST_RACE = """
import ast, gc, inspect, sys, threading
from nic_pipeline.runtime.process import serialise_ast_parsing
if sys.argv[1] == "serialised":
    serialise_ast_parsing()
source = inspect.getsource(inspect)
errors = []

class Cycle:  # garbage with a finaliser: Python code runs inside the AST constructor's allocations
    def __init__(self):
        self.me = self

    def __del__(self):
        sum(range(50))

def parse():
    for _ in range(40):
        for _ in range(200):
            Cycle()
        try:
            ast.parse(source)
        except SystemError as err:
            errors.append(err)

sys.setswitchinterval(1e-6)
gc.set_threshold(50)
threads = [threading.Thread(target=parse) for _ in range(3)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(len(errors))
"""


def parse_errors(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", AST_RACE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.slow
def test_threads_that_parse_at_once_do_not_trip_the_ast_constructor():
    """Three threads parsing with the GIL switching inside the AST constructor: this Python fails
    some parses with "AST constructor recursion depth mismatch", serialised none do."""
    if parse_errors("plain") == 0:
        pytest.skip("this Python's AST constructor does not show the race")
    assert parse_errors("serialised") == 0
