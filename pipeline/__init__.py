"""NIC pipeline: slides in, compressed Zarr tensors out, slide-level classifiers on top.

The front door (``docs/api.md``)::

    import nic_pipeline as nic
    report = nic.compress("slides/", "cohort.zarr")            # embedded cluster, or client=...
    metrics = nic.train("cohort.zarr", "labels.csv", "runs/abmil")
    nic.explain("cohort.zarr", "runs/abmil", "heatmaps/", slides_dir="slides/")

Names load on first use, so ``import nic_pipeline`` (and ``nic --help``) stays instant.
"""

from importlib import import_module

try:
    from importlib.metadata import version as _version

    __version__ = _version("nic-pipeline")
except Exception:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["open_slide", "compress", "train", "predict", "explain", "create_encoder", "connect", "__version__"]

# The subpackage nic_pipeline.compress shares its name with the front door's compress(): load the
# package now and drop its binding, so the attribute resolves to the function (below) while
# `from nic_pipeline.compress.graph import ...` keeps working through sys.modules.
import_module("nic_pipeline.compress")
del compress  # noqa: F821 - bound by the import above


_HOMES = {"open_slide": "nic_pipeline.io", "compress": "nic_pipeline.compress.api", "train": "nic_pipeline.classify.api",
          "predict": "nic_pipeline.classify.api", "explain": "nic_pipeline.classify.api",
          "create_encoder": "nic_models.registry", "connect": "nic_pipeline.runtime.cluster"}
"""Where each front-door name lives (``nic_pipeline.api`` gathers them): a name imports its stage only."""


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nic_pipeline' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
