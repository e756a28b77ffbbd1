"""Faults from outside (issue 13): Ctrl-C during `nic compress`, and a disk that fills up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.faults.conftest import BLOCK, features
from tests.faults.helpers import NIC, REPO, log, nic, noise

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, good_slides):
    """`nic compress` given SIGINT, sent to its whole process group as a terminal's Ctrl-C is,
    two seconds after its cluster is up."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    store = tmp_path_factory.mktemp("sigint") / "s.zarr"
    process = subprocess.Popen([*NIC, "compress", *map(str, good_slides), "--out", str(store), "--workers", "1",
                                "--block", BLOCK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    for line in process.stdout:
        if line.startswith("dashboard: "):
            break
    time.sleep(2)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    log(done)
    return done


def test_ctrl_c_prints_one_line_and_exits_130(interrupted):
    assert interrupted.returncode == 130, interrupted.stderr
    assert [line for line in interrupted.stderr.splitlines() if line.startswith("interrupted: ")] == [
        "interrupted: run the same command again to go on where it stopped"]


def test_ctrl_c_prints_no_traceback(interrupted):
    assert not noise(interrupted), noise(interrupted)


@pytest.fixture
def small_disk(tmp_path):
    """A 48 kB tmpfs (root only; the test is skipped where it cannot be mounted)."""
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_stops_with_one_line_and_resumes_on_a_bigger_one(tmp_path, small_disk, good_slides, finished_store):
    full = nic("compress", good_slides[0], "--out", small_disk / "s.zarr", "--workers", "2", "--block", BLOCK)
    assert full.returncode == 1, full.stderr
    stopped = [line for line in full.stderr.splitlines() if line.startswith("STOPPED: ")]
    assert len(stopped) == 1 and "no space left to write the store" in stopped[0]
    assert not noise(full), noise(full)
    shutil.copytree(small_disk / "s.zarr", tmp_path / "big.zarr")
    resumed = nic("compress", good_slides[0], "--out", tmp_path / "big.zarr", "--workers", "2", "--block", BLOCK)
    assert resumed.returncode == 0, resumed.stderr
    assert "1/1 slides complete" in resumed.stdout
    assert np.array_equal(features(tmp_path / "big.zarr", "good1"), finished_store[1])
