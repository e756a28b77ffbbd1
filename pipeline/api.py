"""The front door as a module (``from nic_pipeline.api import compress``): the names of
``nic_pipeline``'s one list (``nic_pipeline._HOMES``), each imported from its stage on first use."""

import nic_pipeline as _nic

__all__ = list(_nic._HOMES)


def __getattr__(name: str):
    if name in _nic._HOMES:
        return getattr(_nic, name)
    raise AttributeError(f"module 'nic_pipeline.api' has no attribute {name!r}")
