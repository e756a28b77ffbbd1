"""Training configs of ``nic train-encoder``: the defaults, merging, loading and checking a YAML.

A config names the encoder to train (``architecture``, ``init``), the patch geometry, the
training and augmentation settings, and the tasks with their data sources (see
models/configs/nic-mtl-v1.yaml and docs/encoders.md).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from nic_pipeline.errors import NicError
from nic_pipeline.runtime.device import DEVICES

TASK_TYPES = ("classification", "regression", "mask_fraction")

DEFAULTS = {
    "name": "nic-mtl",
    "seed": 0,
    "data_root": None,
    "init": "scratch",  # "scratch" or a registry name / card / weights path to fine-tune from
    "init_heads": False,
    "sample_stream": 0,  # another stream of batches for the same seed (a continued run; the split stays)  # true: start the heads from the init run's <name>.heads.safetensors (continue a run)
    "architecture": "nic-mtl4-tellez2020",  # registry entry whose architecture + spec are trained
    "device": "auto",
    "threads": 1,
    "target_mpp": 0.5,
    "patch_size": 128,
    "code_dim": None,  # None: the init's; a number: a new projection to it (EfficientNet-Lite trunks)
    "training": {
        "epochs": 20, "steps_per_epoch": 50, "batch_per_task": 16, "lr": 1e-3,
        "weight_decay": 1e-4, "patience": 5, "val_fraction": 0.2, "val_grid": 2,
        "balance_classes": True, "min_epochs": 1, "max_minutes": None, "save_every_improvement": True,
    },
    "augment": {
        "dihedral": True, "hed_sigma": 0.05, "brightness": 0.1, "contrast": 0.1,
        "blur_p": 0.2, "blur_sigma": 1.0, "macenko_scale": 0.0, "macenko_shift": 0.0,
    },
    "tasks": [],
}


def merge(base: dict, override: dict) -> dict:
    """A deep copy of ``base`` with ``override`` laid over it (nested dicts merged key by key)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def dotted_overrides(settings) -> dict:
    """``["augment.hed_sigma=0", ...]`` as a nested override dict (values parsed as YAML)."""
    out: dict = {}
    for item in settings or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise NicError(f"--set {item!r}: use KEY=VALUE, e.g. augment.hed_sigma=0")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def load_config(path: str | Path, data_root: str | Path | None = None) -> dict:
    """Read a training config (YAML), fill defaults, resolve ``data_root``.

    ``data_root`` (argument, else ``$NIC_DATA_ROOT``, else the config's ``data_root`` relative
    to the config file) is where the sources' relative paths point.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise NicError(f"{path}: cannot read training config ({exc})") from exc
    config = merge(DEFAULTS, raw)
    root = data_root or os.environ.get("NIC_DATA_ROOT") or config["data_root"] or "."
    root = Path(root)
    if not root.is_absolute() and not data_root:
        root = (path.parent / root).resolve()
    config["data_root"] = str(Path(root).resolve())
    check_config(config, path)
    return config


def check_config(config: dict, path: str | Path) -> None:
    """Raise a one-line :class:`NicError` for a config that cannot train (names ``path``)."""
    if config.get("device", "auto") not in DEVICES:
        raise NicError(f"{path}: device {config['device']!r} is not one of {', '.join(DEVICES)}")
    if not config["tasks"]:
        raise NicError(f"{path}: the config lists no tasks")
    for task in config["tasks"]:
        if task.get("type") not in TASK_TYPES:
            raise NicError(f"{path}: task {task.get('name')!r} has type {task.get('type')!r}; "
                           "use classification, regression or mask_fraction")
        if not task.get("sources"):
            raise NicError(f"{path}: task {task.get('name')!r} has no sources")
