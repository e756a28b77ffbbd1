"""Fixtures for the deployment tests: a tiny synthetic cohort, the one-node SLURM cluster of
``.ci/slurm-up`` (tests skip with a reason where it is not running), and job helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def nic(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> str:
    """Run the ``nic`` CLI of this checkout in a subprocess and return its stdout; fail on error."""
    proc = subprocess.run([sys.executable, "-m", "nic_pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"nic {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def slide_statuses(store: Path) -> dict[str, str]:
    """Slide id -> status, as ``nic inspect --json`` reports them."""
    return {s["slide_id"]: s["status"] for s in json.loads(nic("inspect", str(store), "--json"))}


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Four 1024 x 1024 synthetic slides with labels.csv."""
    out = tmp_path_factory.mktemp("cohort") / "slides"
    nic("synth", str(out), "--slides", "4", "--width", "1024", "--height", "1024")
    return out


def _slurm_problem() -> str | None:
    """Why SLURM jobs cannot run here, or None when the partition has a usable node."""
    if shutil.which("sbatch") is None:
        return "sbatch not installed (run .ci/slurm-up)"
    try:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    if not any(s.strip() in ("idle", "mixed", "allocated") for s in states.stdout.split()):
        return f"no SLURM node up (sinfo: {states.stdout.strip() or states.stderr.strip()}); run .ci/slurm-up"
    return None


@pytest.fixture(scope="session")
def slurm() -> None:
    """Skip unless a SLURM cluster accepts jobs here."""
    problem = _slurm_problem()
    if problem:
        pytest.skip(problem)


def job_environment(**extra: str) -> dict[str, str]:
    """Environment for jobs and CLI runs: this interpreter's environment and this checkout's code."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def sbatch(script: Path, *args: str, options: tuple[str, ...] = (), env: dict, log: Path) -> str:
    """Submit a batch script; return its job id."""
    cmd = ["sbatch", "--parsable", "-o", str(log), *options, str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str:
    """A job's state (RUNNING, COMPLETED, FAILED, ...), or '' when SLURM no longer knows it."""
    proc = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True, timeout=20)
    for field in proc.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return ""


def wait_for_job(job_id: str, log: Path, timeout: float = 600) -> None:
    """Wait until a job ends; fail with its log unless it COMPLETED."""
    deadline = time.monotonic() + timeout
    state = job_state(job_id)
    while state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING") and time.monotonic() < deadline:
        time.sleep(2)
        state = job_state(job_id)
    text = log.read_text() if log.exists() else "(no log)"
    assert state == "COMPLETED", f"job {job_id} ended {state or 'unknown'}:\n{text[-3000:]}"


def cancel(*job_ids: str) -> None:
    """Cancel jobs (scheduler and worker jobs outlive the client)."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)
