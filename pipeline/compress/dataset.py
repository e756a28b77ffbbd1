"""A compressed slide as a lazy xarray Dataset: ``features`` (feature, y, x), ``tissue`` (y, x) and
the cell centres ``y``/``x`` in µm, with the slide's settings as attributes.

Apart from :mod:`nic_pipeline.compress.store` so that writers (the workers, the ``nic compress``
client) never import xarray and pandas.
"""

from __future__ import annotations

import os

import xarray as xr


def open_slide_tensor(store: str | os.PathLike, slide_id: str) -> xr.Dataset:
    """The compressed slide ``slide_id`` of ``store``, read lazily (nothing is loaded until used)."""
    return xr.open_zarr(str(store), group=slide_id, consolidated=False, zarr_format=3)
