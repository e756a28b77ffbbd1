"""NIC pipeline: slides in, compressed Zarr tensors out, slide-level classifiers on top."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("nic-pipeline")
except Exception:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"
