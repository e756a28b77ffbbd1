"""``nic train-encoder``: supervised multitask training of the NIC patch encoder.

A YAML config (:mod:`nic_pipeline.encoder.config`) lists tasks; each task is one data set
(:mod:`nic_pipeline.encoder.taskdata`) with its own head on the shared encoder
(:mod:`nic_models.multitask`). Patches are cut at the encoder's µm/px (0.5) and size (128 px) from
tiles of any µm/px (each source declares it), with task-balanced batches (the same number of
patches from every task in each step), class-balanced sampling within a task, per-task loss
weights, rotation/flip + HED stain + brightness/contrast + blur augmentation, a group-aware
train/validation split, per-task validation metrics every epoch (:mod:`nic_pipeline.encoder.metrics`)
and early stopping.

Output: ``<name>.safetensors`` (the encoder trunk, loadable by :func:`nic_models.registry.create_encoder`),
``<name>.heads.safetensors`` and the JSON card ``<name>.json`` (tasks, data sources with hashes and
licences, µm/px, normalisation, per-task validation metrics, command, config).
See docs/encoders.md and models/configs/nic-mtl-v1.yaml.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nic_models.encoders import file_sha256
from nic_models.multitask import (NORMALISATION_NOTES, HeadSpec, MultiTaskNet, card_architecture, head_state, task_loss,
                                  with_projection)
from nic_models.registry import create_encoder
from nic_pipeline.encoder.config import load_config, merge
from nic_pipeline.encoder.metrics import SCORE_IS, primary_metric, task_metrics, validation_score
from nic_pipeline.encoder.taskdata import TaskData, build_task, sample_batch
from nic_pipeline.errors import NicError
from nic_pipeline.runtime.device import torch_device
from nic_pipeline.runtime.progress import progress_bar

TRAINED_BY = "nic train-encoder (pipeline/encoder/train.py)"


def _setup_torch(config: dict) -> torch.device:
    """Seed torch, make it deterministic, set its threads; return the device the config asks for."""
    torch.manual_seed(int(config["seed"]))
    torch.use_deterministic_algorithms(True, warn_only=True)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    device = torch_device(config.get("device", "auto"))
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    return device


def build_model(config: dict, tasks: list[TaskData], device) -> MultiTaskNet:
    """The multitask net: encoder from ``init`` (scratch = seeded random init) + one head per task."""
    seed = int(config["seed"])
    if config["init"] in ("scratch", None):
        encoder = create_encoder(config["architecture"], random_init=True, seed=seed)
    else:
        encoder = create_encoder(config["init"], seed=seed)
    if config.get("code_dim") and int(config["code_dim"]) != encoder.spec.code_dim:
        torch.manual_seed(seed + 2)
        encoder = with_projection(encoder, int(config["code_dim"]), int(config["patch_size"]),
                                  float(config["target_mpp"]))
    heads = [HeadSpec(t.name, t.head_kind, len(t.classes) if t.classes else 1) for t in tasks]
    torch.manual_seed(seed + 1)
    model = MultiTaskNet(encoder, heads)
    if config.get("init_heads") and encoder.spec.weights:
        load_matching_heads(model, heads_file(encoder.spec.weights))
    return model.to(device)


def sampling_rng(config: dict) -> np.random.Generator:
    """The generator of training batches and augmentation: the seed's, or with ``sample_stream: N``
    another stream of the same seed, so that a continued run draws new batches while its
    validation split (made from the seed alone) stays the same."""
    seed, stream = int(config["seed"]), int(config.get("sample_stream") or 0)
    return np.random.default_rng([seed, stream] if stream else seed)


def heads_file(weights: str | Path) -> Path:
    """Where ``nic train-encoder`` writes the heads beside a trunk: ``<name>.heads.safetensors``."""
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".heads.safetensors")


def load_matching_heads(model: MultiTaskNet, path: Path) -> list[str]:
    """Start the heads from an earlier run's (``init_heads: true``, to continue a run): each task
    whose head has the same shape there; the names of the heads taken."""
    if not path.is_file():
        raise NicError(f"init_heads: {path} not found (the init encoder has no heads file beside it)")
    saved = load_file(str(path))
    taken = []
    for name, head in model.heads.items():
        state = {k: saved.get(f"{name}.{k}") for k in ("weight", "bias")}
        if all(v is not None and v.shape == getattr(head, k).shape for k, v in state.items()):
            head.load_state_dict(state)
            taken.append(name)
    return taken


def evaluate(model, tasks: list[TaskData], device, batch_size: int = 256) -> dict:
    """Per-task validation metrics of the current model (eval mode, no augmentation)."""
    model.eval()
    results = {}
    with torch.inference_mode():
        for t in tasks:
            if t.val_x is None or not len(t.val_x):
                continue
            outs = []
            for start in range(0, len(t.val_x), batch_size):
                x = torch.from_numpy(t.val_x[start:start + batch_size]).to(device)
                outs.append(model(x, task=t.name)[1][t.name].float().cpu().numpy())
            results[t.name] = task_metrics(t.head_kind, t.val_y, np.concatenate(outs))
    model.train()
    return results


def selected_tasks(config: dict) -> list[dict]:
    """The config's tasks less those named in ``exclude_tasks``."""
    excluded = set(config.get("exclude_tasks") or [])
    task_cfgs = [t for t in config["tasks"] if t["name"] not in excluded]
    if not task_cfgs:
        raise NicError("every task is excluded: nothing to train")
    return task_cfgs


def _check_geometry(model: MultiTaskNet, config: dict) -> None:
    """The config's patch size and µm/px must be the encoder's."""
    spec = model.encoder.spec
    if spec.patch_size != config["patch_size"] or abs(spec.mpp - config["target_mpp"]) > 1e-6:
        raise NicError(f"config patch_size/target_mpp ({config['patch_size']}, {config['target_mpp']}) "
                       f"differ from the encoder's ({spec.patch_size}, {spec.mpp})")


def _train_epoch(model, tasks: list[TaskData], opt, rng, config: dict, device, desc: str, progress: bool) -> dict:
    """One epoch of task-balanced steps; return each task's mean training loss."""
    tr, aug = config["training"], config["augment"]
    size, target_mpp = int(config["patch_size"]), float(config["target_mpp"])
    steps = int(tr["steps_per_epoch"])
    heads = model.head_specs
    losses = {t.name: 0.0 for t in tasks}
    bar = progress_bar(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        batches = [sample_batch(t, int(t.batch or tr["batch_per_task"]), rng, size, target_mpp, aug,
                                bool(tr["balance_classes"])) for t in tasks]
        x = torch.from_numpy(np.concatenate([b[0] for b in batches])).to(device)
        codes = model.encoder(x)
        loss, start = 0.0, 0
        for t, (bx, by) in zip(tasks, batches):
            out = model.heads[t.name](codes[start:start + len(bx)])
            start += len(bx)
            task_l = task_loss(heads[t.name], out, torch.from_numpy(by).to(device))
            losses[t.name] += task_l.item() / steps
            loss = loss + t.weight * task_l
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def train_encoder(config_path: str | Path, out_dir: str | Path, command: str | None = None,
                  data_root: str | Path | None = None, progress: bool = True,
                  overrides: dict | None = None) -> dict:
    """Train the encoder a config describes; write weights, heads and card to ``out_dir``.

    Returns the model card (also written as ``<out_dir>/<name>.json``). ``overrides`` is merged
    into the config (e.g. ``{"training": {"epochs": 2}}``, or leaving a task out for
    leave-one-task-out runs: ``{"exclude_tasks": ["lc25000_lung"]}``).
    """
    t_start = time.time()
    config = load_config(config_path, data_root)
    if overrides:
        config = merge(config, overrides)
    command = command or f"nic train-encoder {config_path} --out {out_dir}"
    task_cfgs = selected_tasks(config)
    device = _setup_torch(config)
    rng = sampling_rng(config)
    tasks = [build_task(t, config, progress=progress) for t in task_cfgs]
    model = build_model(config, tasks, device)
    _check_geometry(model, config)
    tr = config["training"]
    opt = torch.optim.Adam(model.parameters(), lr=float(tr["lr"]), weight_decay=float(tr["weight_decay"]))
    history, best, best_state, bad_epochs = [], -np.inf, None, 0
    model.train()
    for epoch in range(int(tr["epochs"])):
        losses = _train_epoch(model, tasks, opt, rng, config, device, f"epoch {epoch + 1}/{tr['epochs']}", progress)
        metrics = evaluate(model, tasks, device)
        score = validation_score(tasks, metrics, losses)
        history.append({"epoch": epoch + 1, "train_loss": losses, "val": metrics, "score": score,
                        "elapsed_s": round(time.time() - t_start, 1)})
        if progress:
            per_task = "  ".join(f"{n}={primary_metric('', m):.3f}" for n, m in metrics.items())
            print(f"epoch {epoch + 1}: score {score:.4f}  {per_task}", flush=True)
        if score > best:
            best, bad_epochs = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_epoch = epoch + 1
            if tr.get("save_every_improvement", True):  # an interrupted run still leaves its best model
                write_outputs(model, tasks, config, out_dir, command, history, best_epoch,
                              time.time() - t_start, device)
        else:
            bad_epochs += 1
            if bad_epochs >= int(tr["patience"]) and epoch + 1 >= int(tr["min_epochs"]):
                break
        if tr.get("max_minutes") and time.time() - t_start > 60 * float(tr["max_minutes"]):
            if progress:
                print(f"stopping: time budget of {tr['max_minutes']} min reached", flush=True)
            break
    model.load_state_dict(best_state)
    return write_outputs(model, tasks, config, out_dir, command, history, best_epoch, time.time() - t_start, device)


def write_outputs(model, tasks: list[TaskData], config: dict, out_dir, command: str, history: list,
                  best_epoch: int, seconds: float, device) -> dict:
    """Write ``<name>.safetensors``, ``<name>.heads.safetensors`` and the card ``<name>.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = config["name"]
    net = model.encoder.net
    weights = out_dir / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(weights), metadata={"name": name})
    heads_path = out_dir / f"{name}.heads.safetensors"
    save_file(head_state(model), str(heads_path), metadata={"name": name})
    spec = model.encoder.spec
    best = next(h for h in history if h["epoch"] == best_epoch)
    card = {
        "name": name,
        "aliases": [],
        "description": config.get("description", f"NIC encoder trained by supervised multitask learning "
                                                  f"on {len(tasks)} tasks ({', '.join(t.name for t in tasks)})."),
        **dict(zip(("architecture", "architecture_kwargs"), card_architecture(net, spec.patch_size))),
        "patch_size": spec.patch_size,
        "stride": spec.stride,
        "mpp": spec.mpp,
        "code_dim": spec.code_dim,
        "normalisation": spec.normalisation,
        "normalisation_note": NORMALISATION_NOTES.get(spec.normalisation, ""),
        "weights": weights.name,
        "weights_sha256": file_sha256(weights),
        "heads": heads_path.name,
        "licence": _licence(config, tasks),
        "source": {"trained_by": TRAINED_BY, "init": str(config["init"]), "command": command},
        "citation": config.get("citation", "Method: D. Tellez et al., Extending Unsupervised Neural Image "
                                           "Compression With Supervised Multitask Learning, MIDL 2020."),
        "tasks": [_task_record(t) for t in tasks],
        "validation": {"best_epoch": best_epoch, "score": best["score"], "metrics": best["val"],
                       "score_is": SCORE_IS},
        "history": history,
        "training": {
            "seed": int(config["seed"]), "device": str(device), "seconds": round(seconds, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "command": command,
        "config": _jsonable(config),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    for path in (weights, heads_path):  # safetensors writes 0600; weights are package data
        path.chmod(0o644)
    return card


def _licence(config: dict, tasks: list[TaskData]) -> dict:
    """The card's licence block: the config's terms for the weights, the sources' for the data."""
    licences = sorted({s.get("licence", "unknown") for t in tasks for s in t.sources})
    return {
        "spdx": config.get("licence_spdx", "NOASSERTION"),
        **({"copyright": config["copyright"]} if config.get("copyright") else {}),
        **({"file": config["licence_file"]} if config.get("licence_file") else {}),
        "weights": config.get("licence", "see the data licences"),
        "data": "; ".join(licences),
    }


def _task_record(t: TaskData) -> dict:
    """What the card says about one task: kind, classes, target scaling, split sizes, sources."""
    return {
        "name": t.name, "type": t.kind, "weight": t.weight, "batch": t.batch, "classes": t.classes,
        "target_mean": t.mean if t.kind != "classification" else None,
        "target_std": t.std if t.kind != "classification" else None,
        "n_tiles": len(t.images), "n_groups": int(len(np.unique(t.groups))),
        "n_train_tiles": int(len(t.train_idx)), "n_val_tiles": int(len(t.val_idx)),
        "val_groups": sorted(set(t.groups[t.val_idx].tolist())),
        "sources": t.sources,
    }


def _jsonable(obj):
    """``obj`` with NumPy scalars, paths and tuples turned into plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj
