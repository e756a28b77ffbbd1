"""The front door's ``compress``: slide files or folders in, a Zarr store of code grids out.

Kept apart from the training front door (:mod:`nic_pipeline.classify.api`) so that ``nic compress``
imports only what compression needs: the command's start-up is part of every job's wall time.
"""

from __future__ import annotations

import os
from dataclasses import replace

from nic_pipeline.compress.graph import CompressReport, RunOptions
from nic_pipeline.compress.graph import compress as run_compress
from nic_pipeline.compress.grid import DEFAULT_BLOCK, DEFAULT_MIN_TISSUE
from nic_pipeline.compress.jobs import SlideJob, plan_jobs
from nic_pipeline.compress.settings import EncoderSettings
from nic_pipeline.runtime.cluster import client_or_embedded
from nic_pipeline.runtime.preflight import absolute, preflight


def compress(slides, store: str | os.PathLike, client=None, *, encoder: str = "nic", weights=None,
             mpp: float | None = None, mpp_csv=None, force_mpp: bool = False, precision: str = "auto",
             device: str = "auto", block: int = DEFAULT_BLOCK, stride: int | None = None,
             min_tissue: float = DEFAULT_MIN_TISSUE, verify: bool = False, redo_changed: bool = False,
             wait_workers: int = 1, wait_timeout: float = 300.0,
             progress: bool = True, stain_norm: str = "none", stain_target=None,
             **encoder_options) -> CompressReport:
    """Compress slide files or folders (or a list of :class:`SlideJob`) into a Zarr ``store``.

    ``mpp`` fills in slides whose metadata has no µm/px (``force_mpp``: every slide);
    ``block``: the largest block side in cells (small slides get smaller blocks); ``stride``: px
    between patches (default the encoder's; 64 for overlapping 128 px patches, 4x the cells);
    ``verify`` re-reads the shards of finished slides; ``stain_norm`` (macenko, reinhard)
    normalises each slide's stain onto ``stain_target`` (a reference slide or image, or
    ``"cohort"``) before encoding. Returns a :class:`CompressReport`.
    """
    jobs = list(slides) if slides and isinstance(next(iter(slides)), SlideJob) else plan_jobs(
        [absolute(p) for p in ([slides] if isinstance(slides, (str, os.PathLike)) else slides)],
        mpp=mpp, mpp_csv=absolute(mpp_csv), force_mpp=force_mpp)
    settings = EncoderSettings(encoder, absolute(weights), precision=precision, device=device, **encoder_options)
    if str(encoder).endswith(".json"):  # an encoder card given by path
        settings = replace(settings, name=absolute(encoder))
    store = absolute(store)
    with client_or_embedded(client) as active:
        preflight(active, inputs=[j.path for j in jobs if not j.problem] + [p for p in (settings.weights,) if p],
                  outputs=[store], wait_workers=wait_workers, timeout=wait_timeout)
        return run_compress(jobs, store, active, settings, block=block, min_tissue=min_tissue, progress=progress,
                            options=RunOptions(verify=verify, redo_changed=redo_changed),
                            stain_norm=stain_norm, stain_target=stain_target, stride=stride)
