"""``nic train-encoder``: supervised multitask training of the NIC patch encoder.

A YAML config lists tasks; each task is one data set with its own head on the shared encoder
(:mod:`models.multitask`). Patches are cut at the encoder's µm/px (0.5) and size (128 px) from
tiles of any µm/px (each source declares it), with task-balanced batches (the same number of
patches from every task in each step), class-balanced sampling within a task, per-task loss
weights, rotation/flip + HED stain + brightness/contrast + blur augmentation, a group-aware
train/validation split, per-task validation metrics every epoch and early stopping.

Output: ``<name>.safetensors`` (the encoder trunk, loadable by :func:`models.registry.create_encoder`),
``<name>.heads.safetensors`` and the JSON card ``<name>.json`` (tasks, data sources with hashes and
licences, µm/px, normalisation, per-task validation metrics, command, config).
See docs/encoders.md and models/configs/nic-mtl-v1.yaml.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import NicError
from pipeline.io.masks import read_mask
from pipeline.encoder import tiles as T

DEFAULTS = {
    "name": "nic-mtl",
    "seed": 0,
    "data_root": None,
    "init": "scratch",  # "scratch" or a registry name / card / weights path to fine-tune from
    "architecture": "nic-mtl4-tellez2020",  # registry entry whose architecture + spec are trained
    "device": "auto",
    "threads": 1,
    "target_mpp": 0.5,
    "patch_size": 128,
    "training": {
        "epochs": 20, "steps_per_epoch": 50, "batch_per_task": 16, "lr": 1e-3,
        "weight_decay": 1e-4, "patience": 5, "val_fraction": 0.2, "val_grid": 2,
        "balance_classes": True, "min_epochs": 1, "max_minutes": None, "save_every_improvement": True,
    },
    "augment": {
        "dihedral": True, "hed_sigma": 0.05, "brightness": 0.1, "contrast": 0.1,
        "blur_p": 0.2, "blur_sigma": 1.0,
    },
    "tasks": [],
}


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path, data_root: str | Path | None = None) -> dict:
    """Read a training config (YAML), fill defaults, resolve ``data_root``.

    ``data_root`` (argument, else ``$NIC_DATA_ROOT``, else the config's ``data_root`` relative
    to the config file) is where the sources' relative paths point.
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise NicError(f"{path}: cannot read training config ({exc})") from exc
    config = _merge(DEFAULTS, raw)
    root = data_root or os.environ.get("NIC_DATA_ROOT") or config["data_root"] or "."
    root = Path(root)
    if not root.is_absolute() and not data_root:
        root = (path.parent / root).resolve()
    config["data_root"] = str(Path(root).resolve())
    if not config["tasks"]:
        raise NicError(f"{path}: the config lists no tasks")
    for task in config["tasks"]:
        if task.get("type") not in ("classification", "regression", "mask_fraction"):
            raise NicError(f"{path}: task {task.get('name')!r} has type {task.get('type')!r}; "
                           "use classification, regression or mask_fraction")
        if not task.get("sources"):
            raise NicError(f"{path}: task {task.get('name')!r} has no sources")
    return config


# --------------------------------------------------------------------------- task data


@dataclass
class TaskData:
    """One task's tiles in memory, its split, fixed validation patches and target scaling."""

    name: str
    kind: str  # classification | regression | mask_fraction
    weight: float
    images: list
    mpps: np.ndarray
    masks: list
    targets: np.ndarray
    groups: np.ndarray
    classes: list[str] | None = None
    train_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    val_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    mean: float = 0.0
    std: float = 1.0
    sources: list = field(default_factory=list)

    @property
    def head_kind(self) -> str:
        return "classification" if self.kind == "classification" else "regression"


def build_task(task_cfg: dict, config: dict, progress: bool = False) -> TaskData:
    """Read a task's sources, load the tiles (pre-downsampled to the target µm/px) and split them."""
    import pandas as pd

    target_mpp = float(config["target_mpp"])
    size = int(config["patch_size"])
    root = config["data_root"]
    kind = task_cfg["type"]
    tables, sources = [], []
    for source in task_cfg["sources"]:
        table = T.read_source(source, root)
        if source.get("min_size"):
            from PIL import Image

            keep = [min(Image.open(p).size) >= source["min_size"] for p in table["path"]]
            table = table[keep]
        src_root = Path(table["root"].iloc[0])
        files = list(table["path"]) + [m for m in table.get("mask", []) if isinstance(m, str)]
        sources.append({
            "path": os.path.relpath(src_root, root),
            "n_tiles": int(len(table)),
            "sha256": T.dataset_sha256([os.path.relpath(f, root) for f in files], root),
            "hash_of": "sha256 over the sorted relative file names + contents (tiles and masks)",
            "mpp": float(source["mpp"]),
            **{k: source[k] for k in ("mpp_note", "licence", "citation") if k in source},
        })
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    images, masks, mpps = [], [], []
    from tqdm.auto import tqdm

    for row in tqdm(table.itertuples(), total=len(table), desc=f"load {task_cfg['name']}",
                    disable=not progress, leave=False):
        image = T.read_rgb(row.path)
        mask = read_mask(row.mask).astype(np.float32) if kind == "mask_fraction" else None
        image, mpp, mask = T.prepare_image(image, row.mpp, target_mpp, mask)
        images.append(image)
        masks.append(mask)
        mpps.append(mpp)
    classes = None
    if kind == "classification":
        classes = sorted(table["label"].unique())
        targets = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    elif kind == "regression":
        targets = table["value"].astype(float).to_numpy()
    else:
        targets = np.full(len(table), np.nan)
    data = TaskData(name=task_cfg["name"], kind=kind, weight=float(task_cfg.get("weight", 1.0)),
                    images=images, mpps=np.asarray(mpps, float), masks=masks, targets=targets,
                    groups=table["group"].to_numpy(), classes=classes, sources=sources)
    tr = config["training"]
    data.train_idx, data.val_idx = T.group_split(
        data.groups, targets if kind == "classification" else None,
        float(task_cfg.get("val_fraction", tr["val_fraction"])), seed=int(config["seed"]))
    _make_validation(data, size, target_mpp, int(task_cfg.get("val_grid", tr["val_grid"])))
    _fit_scaling(data, size, target_mpp, np.random.default_rng(int(config["seed"]) + 7))
    return data


def _patch_target(data: TaskData, i: int, box) -> float:
    if data.kind == "mask_fraction":
        return T.box_mean(data.masks[i], box)
    return float(data.targets[i])


def _make_validation(data: TaskData, size: int, target_mpp: float, grid: int) -> None:
    """Fixed validation patches: a ``grid x grid`` set of crops per validation tile, no augmentation."""
    xs, ys = [], []
    for i in data.val_idx:
        side = T.source_side(data.mpps[i], target_mpp, size)
        for box in T.grid_boxes(data.images[i].shape, side, grid):
            xs.append(T.crop_resample(data.images[i], box, size))
            ys.append(_patch_target(data, i, box))
    data.val_x = np.stack(xs) if xs else np.zeros((0, size, size, 3), np.uint8)
    data.val_y = np.asarray(ys)


def _fit_scaling(data: TaskData, size: int, target_mpp: float, rng: np.random.Generator, n: int = 512) -> None:
    """Mean/std of regression targets on the training side (targets are standardised for the loss)."""
    if data.kind == "classification" or not len(data.train_idx):
        return
    if data.kind == "regression":
        values = data.targets[data.train_idx]
    else:
        values = []
        for i in rng.choice(data.train_idx, size=n):
            box = T.random_box(data.images[i].shape, T.source_side(data.mpps[i], target_mpp, size), rng)
            values.append(T.box_mean(data.masks[i], box))
    data.mean, data.std = float(np.mean(values)), float(np.std(values) + 1e-6)


def sample_batch(data: TaskData, n: int, rng: np.random.Generator, size: int, target_mpp: float,
                 augment: dict, balance_classes: bool = True):
    """``n`` augmented training patches of one task and their (standardised) targets."""
    idx = data.train_idx
    if data.kind == "classification" and balance_classes:
        labels = data.targets[idx]
        present = np.unique(labels)
        chosen_classes = rng.choice(present, size=n)
        picks = np.array([rng.choice(idx[labels == c]) for c in chosen_classes])
    else:
        picks = rng.choice(idx, size=n)
    xs, ys = [], []
    aug = {"hed_sigma": augment["hed_sigma"], "brightness": augment["brightness"],
           "contrast": augment["contrast"], "blur_p": augment["blur_p"],
           "blur_sigma": augment["blur_sigma"], "use_dihedral": augment["dihedral"]}
    for i in picks:
        box = T.random_box(data.images[i].shape, T.source_side(data.mpps[i], target_mpp, size), rng)
        xs.append(T.augment_patch(T.crop_resample(data.images[i], box, size), rng, **aug))
        ys.append(_patch_target(data, i, box))
    ys = np.asarray(ys, dtype=np.float64)
    if data.kind != "classification":
        ys = (ys - data.mean) / data.std
    return np.stack(xs), ys


# --------------------------------------------------------------------------- metrics


def task_metrics(kind: str, y_true: np.ndarray, output: np.ndarray) -> dict:
    """Validation metrics: balanced accuracy, accuracy and AUC (macro one-vs-rest) for
    classification; Spearman and Pearson correlation for regression."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    if len(y_true) == 0:
        return {}
    if kind == "classification":
        y_true = y_true.astype(int)
        pred = output.argmax(1)
        out = {"balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
               "accuracy": float(accuracy_score(y_true, pred))}
        present = np.unique(y_true)
        if len(present) >= 2:
            prob = np.exp(output - output.max(1, keepdims=True))
            prob /= prob.sum(1, keepdims=True)
            if output.shape[1] == 2:
                out["auc"] = float(roc_auc_score(y_true, prob[:, 1]))
            else:
                sub = prob[:, present] / prob[:, present].sum(1, keepdims=True)
                y_sub = np.searchsorted(present, y_true)
                out["auc"] = float(roc_auc_score(y_sub, sub, multi_class="ovr", average="macro")) \
                    if len(present) > 2 else float(roc_auc_score(y_sub, sub[:, 1]))
        return out
    pred = output.reshape(-1)
    if np.std(pred) == 0 or np.std(y_true) == 0:
        return {"spearman": 0.0, "pearson": 0.0}
    return {"spearman": float(spearmanr(y_true, pred).statistic), "pearson": float(pearsonr(y_true, pred).statistic)}


def primary_metric(kind: str, metrics: dict) -> float:
    """The one number per task that early stopping averages (balanced accuracy / Spearman)."""
    return float(metrics.get("balanced_accuracy", metrics.get("spearman", 0.0)))


SCORE_IS = ("mean over tasks of balanced accuracy (classification) / Spearman (regression), "
            "weighted by sqrt(number of validation groups)")


def validation_score(tasks: list, metrics: dict, losses: dict) -> float:
    """Early-stopping score: the tasks' primary metrics averaged with weights sqrt(#validation groups).

    A task validated on 5 tiles swings by 0.2 between epochs; weighting by the square root of
    its independent validation samples keeps such tasks from deciding the best epoch alone
    while still counting them. Without validation data: minus the training loss.
    """
    values, weights = [], []
    for t in tasks:
        if metrics.get(t.name):
            values.append(primary_metric(t.head_kind, metrics[t.name]))
            weights.append(np.sqrt(len(np.unique(t.groups[t.val_idx]))))
    if not values:
        return -float(sum(losses.values()))
    return float(np.average(values, weights=weights))


# --------------------------------------------------------------------------- training


def _setup_torch(config: dict):
    import torch

    seed = int(config["seed"])
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    wanted = config.get("device", "auto")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    return torch.device(wanted)


def build_model(config: dict, tasks: list[TaskData], device):
    """The multitask net: encoder from ``init`` (scratch = seeded random init) + one head per task."""
    import torch
    from models.multitask import HeadSpec, MultiTaskNet
    from models.registry import create_encoder

    seed = int(config["seed"])
    if config["init"] in ("scratch", None):
        encoder = create_encoder(config["architecture"], random_init=True, seed=seed)
    else:
        encoder = create_encoder(config["init"], seed=seed)
    heads = [HeadSpec(t.name, t.head_kind, len(t.classes) if t.classes else 1) for t in tasks]
    torch.manual_seed(seed + 1)
    return MultiTaskNet(encoder, heads).to(device)


def evaluate(model, tasks: list[TaskData], device, batch_size: int = 256) -> dict:
    """Per-task validation metrics of the current model (eval mode, no augmentation)."""
    import torch

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
            out = np.concatenate(outs)
            y = t.val_y if t.kind == "classification" else t.val_y
            results[t.name] = task_metrics(t.head_kind, y, out)
    model.train()
    return results


def train_encoder(config_path: str | Path, out_dir: str | Path, command: str | None = None,
                  data_root: str | Path | None = None, progress: bool = True,
                  overrides: dict | None = None) -> dict:
    """Train the encoder a config describes; write weights, heads and card to ``out_dir``.

    Returns the model card (also written as ``<out_dir>/<name>.json``). ``overrides`` is merged
    into the config (e.g. ``{"training": {"epochs": 2}}``, or leaving a task out for
    leave-one-task-out runs: ``{"exclude_tasks": ["lc25000_lung"]}``).
    """
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from models.encoders import file_sha256
    from models.multitask import head_state, nic_cnn_kwargs, task_loss

    t_start = time.time()
    config = load_config(config_path, data_root)
    if overrides:
        config = _merge(config, overrides)
    excluded = set(config.get("exclude_tasks") or [])
    task_cfgs = [t for t in config["tasks"] if t["name"] not in excluded]
    if not task_cfgs:
        raise NicError("every task is excluded: nothing to train")
    device = _setup_torch(config)
    rng = np.random.default_rng(int(config["seed"]))
    tasks = [build_task(t, config, progress=progress) for t in task_cfgs]
    model = build_model(config, tasks, device)
    spec = model.encoder.spec
    if spec.patch_size != config["patch_size"] or abs(spec.mpp - config["target_mpp"]) > 1e-6:
        raise NicError(f"config patch_size/target_mpp ({config['patch_size']}, {config['target_mpp']}) "
                       f"differ from the encoder's ({spec.patch_size}, {spec.mpp})")
    tr, aug = config["training"], config["augment"]
    opt = torch.optim.Adam(model.parameters(), lr=float(tr["lr"]), weight_decay=float(tr["weight_decay"]))
    size, target_mpp = int(config["patch_size"]), float(config["target_mpp"])
    heads = model.head_specs
    history, best, best_state, bad_epochs = [], -np.inf, None, 0
    model.train()
    for epoch in range(int(tr["epochs"])):
        losses = {t.name: 0.0 for t in tasks}
        bar = tqdm(range(int(tr["steps_per_epoch"])), desc=f"epoch {epoch + 1}/{tr['epochs']}",
                   disable=not progress, leave=False)
        for _ in bar:
            batches = [sample_batch(t, int(tr["batch_per_task"]), rng, size, target_mpp, aug,
                                    bool(tr["balance_classes"])) for t in tasks]
            x = torch.from_numpy(np.concatenate([b[0] for b in batches])).to(device)
            codes = model.encoder(x)
            loss, start = 0.0, 0
            for t, (bx, by) in zip(tasks, batches):
                out = model.heads[t.name](codes[start:start + len(bx)])
                start += len(bx)
                task_l = task_loss(heads[t.name], out, torch.from_numpy(by).to(device))
                losses[t.name] += task_l.item() / int(tr["steps_per_epoch"])
                loss = loss + t.weight * task_l
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
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
                _write_outputs(model, tasks, config, config_path, out_dir, command, history, best_epoch,
                               time.time() - t_start, device, save_file, file_sha256, head_state, nic_cnn_kwargs)
        else:
            bad_epochs += 1
            if bad_epochs >= int(tr["patience"]) and epoch + 1 >= int(tr["min_epochs"]):
                break
        if tr.get("max_minutes") and time.time() - t_start > 60 * float(tr["max_minutes"]):
            if progress:
                print(f"stopping: time budget of {tr['max_minutes']} min reached", flush=True)
            break
    model.load_state_dict(best_state)
    return _write_outputs(model, tasks, config, config_path, out_dir, command, history, best_epoch,
                          time.time() - t_start, device, save_file, file_sha256, head_state, nic_cnn_kwargs)


def _write_outputs(model, tasks, config, config_path, out_dir, command, history, best_epoch, seconds,
                   device, save_file, file_sha256, head_state, nic_cnn_kwargs) -> dict:
    """Write ``<name>.safetensors``, ``<name>.heads.safetensors`` and the card ``<name>.json``."""
    import torch

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
    licences = sorted({s.get("licence", "unknown") for t in tasks for s in t.sources})
    card = {
        "name": name,
        "aliases": [],
        "description": config.get("description", f"NIC encoder trained by supervised multitask learning "
                                                  f"on {len(tasks)} tasks ({', '.join(t.name for t in tasks)})."),
        "architecture": "nic-cnn",
        "architecture_kwargs": nic_cnn_kwargs(net, spec.patch_size),
        "patch_size": spec.patch_size,
        "stride": spec.stride,
        "mpp": spec.mpp,
        "code_dim": spec.code_dim,
        "normalisation": spec.normalisation,
        "normalisation_note": "x / 255 * 2 - 1 on uint8 RGB, then 2x2 average pooling (inside the model)",
        "weights": weights.name,
        "weights_sha256": file_sha256(weights),
        "heads": heads_path.name,
        "licence": {
            "spdx": config.get("licence_spdx", "NOASSERTION"),
            **({"copyright": config["copyright"]} if config.get("copyright") else {}),
            **({"file": config["licence_file"]} if config.get("licence_file") else {}),
            "weights": config.get("licence", "see the data licences"),
            "data": "; ".join(licences),
        },
        "source": {
            "trained_by": "nic train-encoder (pipeline/train_encoder.py)",
            "init": str(config["init"]),
            "command": command or f"nic train-encoder {config_path} --out {out_dir}",
        },
        "citation": config.get("citation", "Method: D. Tellez et al., Extending Unsupervised Neural Image "
                                           "Compression With Supervised Multitask Learning, MIDL 2020."),
        "tasks": [{
            "name": t.name, "type": t.kind, "weight": t.weight, "classes": t.classes,
            "target_mean": t.mean if t.kind != "classification" else None,
            "target_std": t.std if t.kind != "classification" else None,
            "n_tiles": len(t.images), "n_groups": int(len(np.unique(t.groups))),
            "n_train_tiles": int(len(t.train_idx)), "n_val_tiles": int(len(t.val_idx)),
            "val_groups": sorted(set(t.groups[t.val_idx].tolist())),
            "sources": t.sources,
        } for t in tasks],
        "validation": {"best_epoch": best_epoch, "score": best["score"], "metrics": best["val"],
                       "score_is": SCORE_IS},
        "history": history,
        "training": {
            "seed": int(config["seed"]), "device": str(device), "seconds": round(seconds, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "command": command or f"nic train-encoder {config_path} --out {out_dir}",
        "config": _jsonable(config),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    for path in (weights, heads_path):  # safetensors writes 0600; weights are package data
        path.chmod(0o644)
    return card


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj
