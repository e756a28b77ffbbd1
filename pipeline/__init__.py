"""NIC pipeline: slides in, compressed Zarr tensors out, slide-level classifiers on top.

The front door (``docs/api.md``)::

    import nic_pipeline as nic
    report = nic.compress("slides/", "cohort.zarr")            # embedded cluster, or client=...
    metrics = nic.train("cohort.zarr", "labels.csv", "runs/abmil")
    nic.explain("cohort.zarr", "runs/abmil", "heatmaps/", slides_dir="slides/")

Names load on first use, so ``import nic_pipeline`` (and ``nic --help``) stays instant.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec

try:
    __version__ = version("nic-pipeline")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

_HOMES = {"open_slide": "nic_pipeline.io", "compress": "nic_pipeline.compress.api", "train": "nic_pipeline.classify.api",
          "predict": "nic_pipeline.classify.api", "explain": "nic_pipeline.classify.api",
          "create_encoder": "nic_models.registry", "connect": "nic_pipeline.runtime.cluster"}
"""The front door, in one list: each name and the module it lives in (a name imports its stage only)."""

__all__ = [*_HOMES, "__version__"]



def _names_over_subpackages() -> None:
    """A front-door name that is also a subpackage (``compress``) must resolve to the function.
    Python binds a subpackage on its parent only when it first loads it: load such subpackages
    now and drop that binding, so ``__getattr__`` answers the name, and later imports of their
    modules (``nic_pipeline.compress.graph``) leave it alone."""
    for name in _HOMES:
        if find_spec(f"{__name__}.{name}") is not None:
            import_module(f"{__name__}.{name}")
            globals().pop(name, None)


_names_over_subpackages()


def __getattr__(name: str):
    """A front-door name from its home, on first use."""
    if name in _HOMES:
        value = getattr(import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nic_pipeline' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
