"""What to compress: the slides of a run, each with its id and µm/px, or the reason it cannot be.

Inputs are files, folders (searched recursively) and CSV slide lists (``slide_id,path[,mpp]``).
A file that cannot be a slide becomes a job that carries its problem, so the run reports it at
the end with the rest and goes on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nic_pipeline.errors import SlideError
from nic_pipeline.io import discover_slides, read_mpp_csv, read_slide_list
from nic_pipeline.io.metadata import MPP_FIX, missing_mpp


@dataclass(frozen=True)
class SlideJob:
    """One slide to compress: its file, id, and a µm/px for it (used where the metadata has none,
    or always with ``force_mpp``); ``problem`` marks a slide that failed before any task."""

    path: str
    slide_id: str
    mpp: float | None = None
    force_mpp: bool = False
    problem: str | None = None


def plan_jobs(paths, mpp: float | None = None, mpp_csv: str | None = None, force_mpp: bool = False) -> list[SlideJob]:
    """The slides under ``paths`` (files, folders, or CSV slide lists ``slide_id,path[,mpp]``) with
    their ids and µm/px (a list's or ``mpp_csv``'s value beats ``mpp``).

    A file that cannot be a slide (broken link, unreadable, an id the store cannot hold, two files
    with one id, a bad line of a list) becomes a failed job with its reason; the rest goes on.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    lists = [Path(p) for p in paths if str(p).lower().endswith(".csv")]
    found, problems = discover_slides([p for p in paths if not str(p).lower().endswith(".csv")])
    per_slide = read_mpp_csv(mpp_csv) if mpp_csv else {}
    jobs = [SlideJob(str(path), slide_id, per_slide.get(slide_id, mpp), force_mpp) for slide_id, path in found]
    for slide_list in lists:
        rows, bad = read_slide_list(slide_list)
        jobs += [SlideJob(str(row.path), row.slide_id, row.mpp if row.mpp is not None else per_slide.get(row.slide_id, mpp),
                          force_mpp or row.mpp is not None) for row in rows]
        problems += bad
    jobs += [SlideJob(str(path), str(path), problem=reason) for path, reason in problems]
    return jobs


def slide_mpp(metadata_mpp: float | None, job: SlideJob) -> tuple[float, str]:
    """The µm/px a slide is compressed at, and where it came from: the metadata, unless it has
    none (then the given value) or ``force_mpp`` is set."""
    if job.mpp is not None and (job.force_mpp or metadata_mpp is None):
        return job.mpp, "forced" if job.force_mpp and metadata_mpp is not None else "given"
    if metadata_mpp is None:
        raise SlideError(job.path, f"{missing_mpp(job.path)}; {MPP_FIX}")
    return metadata_mpp, "metadata"
