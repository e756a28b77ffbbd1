"""The Python front door: a cohort from slides to an explained classifier in a few calls.

Every function that runs a graph takes a Dask ``client``; given none, it starts the embedded
local cluster for the call (:func:`nic_pipeline.runtime.cluster.connect`). Paths are made absolute
on the client, because a worker's working directory is not the user's. Each stage's front door
lives in its package (:mod:`nic_pipeline.compress.api`, :mod:`nic_pipeline.classify.api`), so a stage
imports only what it needs; this module gathers them.
"""

from __future__ import annotations

from nic_models.registry import create_encoder
from nic_pipeline.classify.api import explain, predict, train
from nic_pipeline.compress.api import compress
from nic_pipeline.io import open_slide
from nic_pipeline.runtime.cluster import connect

__all__ = ["open_slide", "compress", "train", "predict", "explain", "create_encoder", "connect"]
