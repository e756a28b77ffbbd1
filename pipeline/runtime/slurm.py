"""What SLURM says about itself: the node a partition offers (``sinfo``), the state of jobs
(``squeue``), and job sizes that fit the node. Plain functions over the SLURM commands; None
where a command is missing, fails or does not know the partition."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

SINFO_TIMEOUT = 20.0
HOPELESS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
            "InvalidQOS", "AccountNotAllowed", "DependencyNeverSatisfied"}
"""SLURM's reasons for a pending job that will never start as it is."""


@dataclass(frozen=True)
class PartitionOffer:
    """What one node of a SLURM partition offers, as ``sinfo`` reports it."""

    partition: str
    cpus: int
    memory_mb: int
    gpus: int

    def describe(self) -> str:
        gpus = f"{self.gpus} GPUs" if self.gpus else "no GPUs"
        return f"partition {self.partition}: {self.cpus} CPUs, {self.memory_mb / 1024:.1f} GiB, {gpus} per node"


def gres_gpus(gres: str) -> int:
    """GPUs per node in a ``sinfo`` GRES field: ``gpu:4``, ``gpu:a100:4(S:0-1)``,
    ``gpu:a100:2,gpu:v100:2,mps:400`` (summed), ``(null)`` (none)."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres or ""):
        parts = re.sub(r"\(.*?\)", "", item.strip()).split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_sinfo(text: str, partition: str | None = None) -> PartitionOffer | None:
    """The node of ``partition`` (None: the default one, marked ``*``) from ``sinfo -h -o
    '%P|%c|%m|%G'`` rows. Rows of unlike nodes: the GPU nodes if any, and the smallest of them,
    so that a job fits on every node it may be given."""
    rows = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        name, cpus, memory, gres = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        if (partition is None and not default) or (partition is not None and name != partition):
            continue
        try:
            rows.append(PartitionOffer(name, int(cpus.rstrip("+")), int(memory.rstrip("+")), gres_gpus(gres)))
        except ValueError:
            continue
    if not rows:
        return None
    if any(r.gpus for r in rows):
        rows = [r for r in rows if r.gpus]
    return PartitionOffer(rows[0].partition, min(r.cpus for r in rows), min(r.memory_mb for r in rows),
                          min(r.gpus for r in rows))


def partition_offer(partition: str | None = None) -> PartitionOffer | None:
    """What a node of a SLURM partition (None: the default partition) offers, or None when
    ``sinfo`` is missing, fails, or does not know the partition."""
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G"], capture_output=True, text=True,
                              timeout=SINFO_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_sinfo(done.stdout, partition) if done.returncode == 0 else None


def job_sizes(config: dict, gpus: int, offer: PartitionOffer | None) -> dict:
    """Keywords for cores and memory the config leaves out, from the partition's node: all of it for
    a CPU job, the GPUs' share of it for a GPU job (``job_mem`` in MB as SLURM counts them, so the
    request never rounds up past the node)."""
    sizes = {}
    if offer is None:
        return sizes
    share = min(1.0, gpus / offer.gpus) if gpus and offer.gpus else 1.0
    if not config.get("cores"):
        sizes["cores"] = max(1, int(offer.cpus * share))
    if not config.get("memory"):
        memory_mb = max(1, int(offer.memory_mb * share))
        sizes["memory"] = f"{memory_mb}MiB"
        if not config.get("job-mem"):
            sizes["job_mem"] = f"{memory_mb}M"
    return sizes


def slurm_job_states(job_ids) -> dict[str, tuple[str, str]] | None:
    """Job id -> (state, reason) for the jobs ``squeue`` still lists (None when it does not answer)."""
    try:
        done = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], capture_output=True,
                              text=True, timeout=SINFO_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        return None
    rows = [line.split("|") for line in done.stdout.splitlines() if line.count("|") == 2]
    return {job: (state, reason) for job, state, reason in rows}
