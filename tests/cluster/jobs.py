"""Running ``nic`` as a user would and checking what it wrote, for the multi-host tests.

Stores are compared by array values read through Zarr (every array of every slide group, dtype,
shape and the bytes of the values), not by files, so the checks hold whatever the chunk layout.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

from tests.cluster.netns import repo_env
from tests.conftest import REPO

# Small blocks, so a slide is several tasks; the 8-view mean, so each task takes long enough to
# kill a node mid-run; the CPU, so the timing is the same on machines with a GPU.
COMPRESS_FLAGS = ("--block", "8", "--dihedral-mean", "--device", "cpu")


def nic_env(extra: dict | None = None) -> dict:
    """The environment of a ``nic`` command: the repository under test importable."""
    return repo_env(REPO, extra)


def nic_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "nic_pipeline", *args]


def nic(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``nic ARGS`` to completion (raises ``TimeoutExpired`` after ``timeout`` s)."""
    return subprocess.run(nic_argv(*args), env=nic_env(env), capture_output=True, text=True, timeout=timeout)


def start_nic(*args: str, log: Path) -> subprocess.Popen:
    """Start ``nic ARGS`` in the background, stdout and stderr to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(nic_argv(*args), env=nic_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> tuple[int, str]:
    """Wait for a background ``nic`` (killing it after ``timeout`` s); its exit code and output."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        return -1, f"timed out after {timeout} s\n" + log.read_text(errors="replace")
    return proc.returncode, log.read_text(errors="replace")


@functools.cache
def compress_option(option: str) -> bool:
    """Whether ``nic compress`` of the code under test has ``option``."""
    return option in nic("compress", "--help", timeout=120).stdout


def compress_args(cohort: Path, store: Path, address: str, encoder: str = "nic", wait_workers: int = 0) -> list[str]:
    """``nic compress`` arguments for the cohort onto the cluster at ``address``."""
    args = ["compress", str(cohort), "--out", str(store), "--scheduler", address, "--encoder", encoder,
            *COMPRESS_FLAGS]
    if wait_workers and compress_option("--wait-workers"):
        args += ["--wait-workers", str(wait_workers)]
    return args


def readable(output: str, lines: int = 30) -> str:
    """The last ``lines`` lines of a command's output without its progress bars, for messages."""
    kept = [line for line in output.splitlines()
            if line.strip() and not re.search(r"\d+%\||\d+(?:patch|slide|tile|it)\b|/s\]|\x1b\[", line)]
    return "\n".join(kept[-lines:])


def blocks_encoded(output: str) -> int:
    """The number of blocks the run says it encoded."""
    found = re.findall(r"(\d+) blocks", output)
    assert found, f"no block count in the output:\n{readable(output)}"
    return int(found[-1])


def slide_statuses(store: Path) -> dict[str, str]:
    """Each slide's status, as ``nic inspect --json`` reports it."""
    done = nic("inspect", str(store), "--json", timeout=120)
    assert done.returncode == 0, readable(done.stderr)
    return {row["slide_id"]: row["status"] for row in json.loads(done.stdout)}


def slide_arrays(store: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every array of every slide group in ``store``, by slide and path within the slide."""
    root = zarr.open_group(str(store), mode="r")
    slides = {}
    for name, group in root.groups():
        slides[name] = {path: member[...] for path, member in group.members(max_depth=None)
                        if isinstance(member, zarr.Array)}
    return slides


def assert_same_slides(store: Path, reference: Path) -> None:
    """Every slide of ``store`` holds exactly the arrays of ``reference``: names, dtypes, shapes, bytes."""
    assert_same_arrays(slide_arrays(store), slide_arrays(reference))


def assert_same_arrays(got: dict, want: dict) -> None:
    """Two :func:`slide_arrays` results agree exactly, value bytes included (-0.0 is not 0.0)."""
    assert sorted(got) == sorted(want), f"slides differ: {sorted(got)} vs {sorted(want)}"
    for slide, arrays in want.items():
        assert sorted(got[slide]) == sorted(arrays), f"{slide}: arrays differ: {sorted(got[slide])} vs {sorted(arrays)}"
        for path, expected in arrays.items():
            actual = got[slide][path]
            assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), f"{slide}/{path}"
            if expected.dtype.hasobject:
                np.testing.assert_array_equal(actual, expected, err_msg=f"{slide}/{path}")
                continue
            differs = (_value_bytes(actual) != _value_bytes(expected)).any(-1)
            assert not differs.any(), f"{slide}/{path}: {int(differs.sum())} of {expected.size} values differ"


def _value_bytes(values: np.ndarray) -> np.ndarray:
    """The bytes of each value, as a trailing axis."""
    values = np.ascontiguousarray(values)
    return values.view(np.uint8).reshape(values.shape + (values.dtype.itemsize,))


class CleanRuns:
    """Stores of clean single-job runs, one per encoder, made on first use and kept for the session."""

    def __init__(self, folder: Path, cohort: Path):
        self.folder, self.cohort = folder, cohort
        self.stores: dict[str, Path] = {}

    def store(self, encoder: str, address: str) -> Path:
        """The clean store of ``encoder``, compressed on the cluster at ``address`` if not made yet."""
        if encoder not in self.stores:
            store = self.folder / f"{encoder}.zarr"
            done = nic(*compress_args(self.cohort, store, address, encoder))
            assert done.returncode == 0, readable(done.stdout + done.stderr)
            assert set(slide_statuses(store).values()) == {"complete"}
            self.stores[encoder] = store
        return self.stores[encoder]
