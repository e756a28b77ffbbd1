"""Slide-level learning on compressed cohorts: cross-validated training as a Dask task graph,
prediction and explanation.

The second NIC stage (Tellez et al. 2019). Input is a compressed store (one Zarr group per
slide: ``features`` (feature, y, x) float16, ``tissue`` (y, x)); output is a run directory:

    RUN_DIR/config.json, model.safetensors     final model, trained on all labelled slides
    RUN_DIR/folds/fold-K/...                    the model of each cross-validation fold
    RUN_DIR/oof_predictions.csv                 out-of-fold predictions (slide_id, fold, label, score...)
    RUN_DIR/metrics.json                        per-fold, mean-over-folds and pooled metrics
    RUN_DIR/tasks.json                          which worker ran each fold task, and when

Each fold is one Dask task (``train-fold-K-<model>-<token>``), plus one ``train-final-...``
task; tasks get the store path and slide ids, read tensors themselves one slide (or crop) at a
time through :class:`SlideSource`, save weights to RUN_DIR and return only predictions and
metrics.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.runtime.cluster import connect, gpu_resources
from pipeline.errors import NicError
from pipeline.compress.store import list_slides, open_slide_tensor

MODELS = ("nic-cnn", "abmil", "mean", "max")
TASKS = ("binary", "multiclass", "regression", "survival")

# Hyper-parameter defaults; see docs/classify.md for where each comes from.
DEFAULTS: dict[str, dict] = {
    "nic-cnn": dict(crop=128, steps=2000, batch_size=16, lr=1e-3, lr_final_ratio=0.01,
                    weight_decay=1e-5, dropout=0.2, width=128, depth=8, n_strided=6,
                    pooling="max", hidden=128, cam_layer=1, cam_hires=False),
    "abmil": dict(epochs=200, batch_size=8, lr=5e-4, weight_decay=5e-4, dropout=0.25, embed=128,
                  attention=64, max_cells=8192),
    "mean": dict(epochs=300, lr=1e-2, weight_decay=1e-3),
    "max": dict(epochs=300, lr=1e-2, weight_decay=1e-3),
}
COMMON = dict(seed=0, cache_mb=1024)


def resolve_params(model: str, overrides: dict | None = None) -> dict:
    """Defaults for ``model`` updated with ``overrides``; unknown keys are a NicError."""
    if model not in MODELS:
        raise NicError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    params = {**COMMON, **DEFAULTS[model]}
    unknown = set(overrides or {}) - set(params)
    if unknown:
        raise NicError(f"unknown parameter(s) for {model}: {', '.join(sorted(unknown))}; "
                       f"known: {', '.join(sorted(params))}")
    params.update(overrides or {})
    return params


# --------------------------------------------------------------------------- store access


def list_store_slides(store) -> list[str]:
    """Slide ids of the complete slides in a store."""
    try:
        return list_slides(store, complete_only=True)
    except Exception as err:  # noqa: BLE001 - zarr raises several types for a missing store
        raise NicError(f"{store}: not a readable Zarr store ({err})") from err


def _values(array) -> np.ndarray:
    """Read an xarray slice into numpy, synchronously (safe inside a Dask worker task)."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        return np.asarray(array.values)


class SlideSource:
    """Reads slide tensors from a store one slide (or one crop) at a time.

    Whole slides are kept in a least-recently-used cache bounded by ``cache_mb`` (float16 as
    stored), so small cohorts are read once while cohorts larger than memory stream from Zarr.
    A slide larger than the cache is never loaded whole for crops: crops are read directly.
    """

    def __init__(self, store, cache_mb: float = 1024):
        self.store = str(store)
        self.budget = int(cache_mb * 2**20)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._tissue: dict[str, np.ndarray] = {}
        self._meta: dict[str, dict] = {}

    def dataset(self, slide_id: str):
        return open_slide_tensor(self.store, slide_id)

    def meta(self, slide_id: str) -> dict:
        """Shape (C, ny, nx), attrs and cell-centre coordinates of a slide."""
        if slide_id not in self._meta:
            try:
                ds = self.dataset(slide_id)
            except Exception as err:  # noqa: BLE001
                raise NicError(f"{self.store}: cannot open slide {slide_id!r} ({err})") from err
            feats = ds["features"].transpose("feature", "y", "x")
            self._meta[slide_id] = dict(
                shape=tuple(int(s) for s in feats.shape), attrs=dict(ds.attrs),
                y=np.asarray(ds["y"].values, dtype=float), x=np.asarray(ds["x"].values, dtype=float))
        return self._meta[slide_id]

    def tissue(self, slide_id: str) -> np.ndarray:
        """Tissue fraction per cell, float32 (ny, nx) (small; always kept)."""
        if slide_id not in self._tissue:
            self._tissue[slide_id] = _values(self.dataset(slide_id)["tissue"].transpose("y", "x")).astype(np.float32)
        return self._tissue[slide_id]

    def features(self, slide_id: str) -> np.ndarray:
        """The whole code grid, float16 (C, ny, nx); cached when it fits the budget."""
        if slide_id in self._cache:
            self._cache.move_to_end(slide_id)
            return self._cache[slide_id]
        feats = _values(self.dataset(slide_id)["features"].transpose("feature", "y", "x")).astype(np.float16, copy=False)
        if feats.nbytes <= self.budget:
            while self._cache and self._cached_bytes + feats.nbytes > self.budget:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
            self._cache[slide_id] = feats
            self._cached_bytes += feats.nbytes
        return feats

    def crop(self, slide_id: str, y0: int, x0: int, size: int):
        """Codes (C, size, size) float16 and tissue (size, size) of a window, zero outside the grid."""
        c, ny, nx = self.meta(slide_id)["shape"]
        out = np.zeros((c, size, size), np.float16)
        tis = np.zeros((size, size), np.float32)
        ys, ye, xs, xe = max(y0, 0), min(y0 + size, ny), max(x0, 0), min(x0 + size, nx)
        if ye > ys and xe > xs:
            if slide_id in self._cache or c * ny * nx * 2 <= self.budget:
                window = self.features(slide_id)[:, ys:ye, xs:xe]
            else:
                ds = self.dataset(slide_id)["features"].transpose("feature", "y", "x")
                window = _values(ds[:, ys:ye, xs:xe])
            out[:, ys - y0:ye - y0, xs - x0:xe - x0] = window
            tis[ys - y0:ye - y0, xs - x0:xe - x0] = self.tissue(slide_id)[ys:ye, xs:xe]
        return out, tis

    def valid_cells(self, slide_id: str) -> np.ndarray:
        """Bool (ny, nx): cells that hold tissue codes (tissue > 0 and a non-zero code)."""
        return (self.tissue(slide_id) > 0) & np.any(self.features(slide_id) != 0, axis=0)

    def bag(self, slide_id: str):
        """Codes of the tissue cells (n, C) float32 and their (row, col) indices (n, 2)."""
        feats = self.features(slide_id)
        valid = self.valid_cells(slide_id)
        rows, cols = np.nonzero(valid)
        return feats[:, rows, cols].T.astype(np.float32), np.stack([rows, cols], 1)


# --------------------------------------------------------------------------- labels and folds


def load_labels(path, task: str) -> pd.DataFrame:
    """Read a labels CSV (slide_id,label[,group] or slide_id,time,event[,group]) or check a
    DataFrame of the same columns; NicError if malformed. Rows without a label are dropped."""
    if task not in TASKS:
        raise NicError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if isinstance(path, pd.DataFrame):
        frame, path = path.copy(), "labels"
        if "slide_id" in frame.columns:
            frame["slide_id"] = frame["slide_id"].astype(str)
    else:
        try:
            frame = pd.read_csv(path, dtype={"slide_id": str, "group": str})
        except (OSError, pd.errors.ParserError) as err:
            raise NicError(f"{path}: cannot read labels CSV ({err})") from err
    needed = ["slide_id"] + (["time", "event"] if task == "survival" else ["label"])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise NicError(f"{path}: labels CSV lacks column(s) {', '.join(missing)} needed for task {task}")
    frame = frame.dropna(subset=needed[1:]).reset_index(drop=True)
    dupes = frame["slide_id"][frame["slide_id"].duplicated()].tolist()
    if dupes:
        raise NicError(f"{path}: slide_id listed more than once: {', '.join(dupes[:5])}")
    if len(frame) == 0:
        raise NicError(f"{path}: no labelled slides")
    return frame


def target_spec(labels: pd.DataFrame, task: str) -> dict:
    """How labels map to model targets: class names (sorted; for binary the second is positive),
    or the mean/std used to standardise regression targets."""
    spec: dict = {"task": task}
    if task in ("binary", "multiclass"):
        classes = sorted(labels["label"].astype(str).unique(), key=_natural_key)
        if task == "binary" and len(classes) != 2:
            raise NicError(f"task binary needs exactly 2 label values, found {len(classes)}: {classes[:10]}")
        if task == "multiclass" and len(classes) < 2:
            raise NicError("task multiclass needs at least 2 label values")
        spec["classes"] = classes
    elif task == "regression":
        values = pd.to_numeric(labels["label"], errors="coerce")
        if values.isna().any():
            raise NicError("task regression needs numeric labels")
        spec["mean"], spec["std"] = float(values.mean()), float(values.std(ddof=0) or 1.0)
    return spec


def _natural_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def encode_targets(labels: pd.DataFrame, spec: dict) -> dict[str, np.ndarray]:
    """Arrays target/time/event aligned with the rows of ``labels``."""
    task, n = spec["task"], len(labels)
    out = {"time": np.zeros(n, np.float32), "event": np.zeros(n, np.float32)}
    if task in ("binary", "multiclass"):
        index = {c: i for i, c in enumerate(spec["classes"])}
        out["target"] = labels["label"].astype(str).map(index).to_numpy(np.int64)
    elif task == "regression":
        out["target"] = ((labels["label"].astype(float) - spec["mean"]) / spec["std"]).to_numpy(np.float32)
    else:
        out["time"] = labels["time"].to_numpy(np.float32)
        out["event"] = labels["event"].astype(float).to_numpy(np.float32)
        out["target"] = out["event"].copy()
    return out


def assign_folds(labels: pd.DataFrame, task: str, k: int, seed: int = 0) -> np.ndarray:
    """Fold index per row: stratified for classification (by event for survival), grouped by
    patient when a ``group`` column exists (StratifiedGroupKFold / GroupKFold / KFold)."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    n = len(labels)
    groups = labels["group"].astype(str).to_numpy() if "group" in labels.columns else None
    if task in ("binary", "multiclass"):
        strata = labels["label"].astype(str).to_numpy()
    elif task == "survival":
        strata = labels["event"].astype(int).astype(str).to_numpy()
    else:
        strata = None
    if strata is not None and groups is not None:
        splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    elif strata is not None:
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    elif groups is not None:
        splitter = GroupKFold(k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(k, shuffle=True, random_state=seed)
    folds = np.full(n, -1, dtype=int)
    try:
        for fold, (_, test) in enumerate(splitter.split(np.zeros(n), strata, groups)):
            folds[test] = fold
    except ValueError as err:
        raise NicError(f"cannot make {k} folds from {n} slides ({err}); use fewer --folds") from err
    return folds


# --------------------------------------------------------------------------- trained model bundle


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class SlideModel:
    """A trained slide model and everything needed to apply it to a store."""

    config: dict
    module: object  # torch.nn.Module

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def name(self) -> str:
        return self.config["model"]

    def _norm(self, device):
        import torch

        mean = torch.tensor(self.config["norm_mean"], dtype=torch.float32, device=device)
        std = torch.tensor(self.config["norm_std"], dtype=torch.float32, device=device)
        return mean, std

    def save(self, directory) -> Path:
        """Write model.safetensors and config.json into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(self.config, indent=2))
        return directory / "model.safetensors"

    @classmethod
    def load(cls, directory, device=None) -> "SlideModel":
        """Load a model written by :meth:`save` (RUN_DIR or RUN_DIR/folds/fold-K)."""
        from safetensors.torch import load_file

        from models.classifiers import build_model

        directory = Path(directory)
        if not (directory / "config.json").exists() or not (directory / "model.safetensors").exists():
            raise NicError(f"{directory}: no trained model (config.json + model.safetensors); run `nic train` first")
        config = json.loads((directory / "config.json").read_text())
        module = build_model(config["model"], config["in_channels"], config["n_outputs"], **config["params"])
        module.load_state_dict(load_file(str(directory / "model.safetensors")))
        device = device or _device()
        return cls(config, module.to(device).eval())

    # ------------------------------------------------------------ inputs

    def cnn_input(self, feats: np.ndarray, tissue: np.ndarray):
        """Standardised codes (zero off tissue) plus the tissue fraction as an extra channel."""
        import torch

        device = next(self.module.parameters()).device
        mean, std = self._norm(device)
        x = torch.as_tensor(feats, device=device).float()
        valid = (x != 0).any(dim=-3, keepdim=True)
        x = (x - mean[:, None, None]) / std[:, None, None] * valid
        t = torch.as_tensor(tissue, device=device).float().unsqueeze(-3)
        return torch.cat([x, t], dim=-3)

    def bag_input(self, codes: np.ndarray):
        import torch

        device = next(self.module.parameters()).device
        mean, std = self._norm(device)
        return (torch.as_tensor(codes, device=device).float() - mean) / std

    def crop_origins(self, source: SlideSource, slide_id: str) -> list[tuple[int, int]]:
        """Test-time crops: a tiling of the grid (centred when smaller than a crop), tissue only."""
        size = self.config["params"]["crop"]
        _, ny, nx = source.meta(slide_id)["shape"]
        tissue = source.tissue(slide_id)
        origins = [(y, x) for y in _axis_origins(ny, size) for x in _axis_origins(nx, size)
                   if tissue[max(y, 0):y + size, max(x, 0):x + size].sum() > 0]
        return origins or [(_axis_origins(ny, size)[0], _axis_origins(nx, size)[0])]

    # ------------------------------------------------------------ prediction

    def raw_scores(self, source: SlideSource, slide_id: str) -> np.ndarray:
        """Scores (n_out,) in model units (probabilities, standardised value, or log-risk)."""
        import torch

        from models.classifiers import predict_dihedral, scores_from_outputs

        self.module.eval()
        size = self.config["params"].get("crop")
        with torch.no_grad():
            if self.name == "nic-cnn":
                per_crop = []
                for y0, x0 in self.crop_origins(source, slide_id):
                    feats, tis = source.crop(slide_id, y0, x0, size)
                    per_crop.append(predict_dihedral(self.module, self.cnn_input(feats, tis)[None], self.task)[0])
                return torch.stack(per_crop).mean(0).cpu().numpy()
            codes, _ = source.bag(slide_id)
            if len(codes) == 0:
                raise NicError(f"{source.store}: slide {slide_id!r} has no tissue cells")
            return scores_from_outputs(self.task, self.module(self.bag_input(codes)))[0].cpu().numpy()

    def predict_row(self, source: SlideSource, slide_id: str, scores: np.ndarray | None = None) -> dict:
        """One prediction row: score (binary: P(positive); regression: value; survival: risk),
        or score_<class> and pred for multiclass."""
        scores = self.raw_scores(source, slide_id) if scores is None else scores
        task = self.task
        if task == "multiclass":
            classes = self.config["target"]["classes"]
            row = {f"score_{c}": float(s) for c, s in zip(classes, scores)}
            row["pred"] = classes[int(np.argmax(scores))]
            return row
        if task == "regression":
            return {"score": float(scores[0] * self.config["target"]["std"] + self.config["target"]["mean"])}
        return {"score": float(scores[0])}

    def explain(self, source: SlideSource, slide_id: str, scores: np.ndarray | None = None) -> np.ndarray:
        """Per-cell relevance (ny, nx) float32, NaN off tissue: Grad-CAM (nic-cnn), attention
        relative to uniform (abmil: 1 = average cell), per-cell linear contribution (mean/max).
        Multiclass maps explain the predicted class (``scores`` from raw_scores, if at hand)."""
        import torch

        from models.classifiers import grad_cam

        _, ny, nx = source.meta(slide_id)["shape"]
        valid = source.valid_cells(slide_id)
        heat = np.full((ny, nx), np.nan, np.float32)
        if scores is None and self.task == "multiclass":
            scores = self.raw_scores(source, slide_id)
        index = int(np.argmax(scores)) if self.task == "multiclass" else 0
        self.module.eval()
        if self.name == "nic-cnn":
            p = self.config["params"]
            size = p["crop"]
            total = np.zeros((ny, nx), np.float64)
            count = np.zeros((ny, nx), np.float64)
            for y0, x0 in self.crop_origins(source, slide_id):
                feats, tis = source.crop(slide_id, y0, x0, size)
                cam = grad_cam(self.module, self.cnn_input(feats, tis), p["cam_layer"], index,
                               hires=p.get("cam_hires", False)).cpu().numpy()
                ys, ye, xs, xe = max(y0, 0), min(y0 + size, ny), max(x0, 0), min(x0 + size, nx)
                total[ys:ye, xs:xe] += cam[ys - y0:ye - y0, xs - x0:xe - x0]
                count[ys:ye, xs:xe] += 1
            heat[valid] = (total / np.maximum(count, 1))[valid]
            return heat
        codes, cells = source.bag(slide_id)
        with torch.no_grad():
            bag = self.bag_input(codes)
            if self.name == "abmil":
                _, attention = self.module.attention(bag)
                values = attention * len(codes)
            else:
                values = self.module.contributions(bag, index)
        heat[cells[:, 0], cells[:, 1]] = values.cpu().numpy()
        return heat


def _axis_origins(n: int, size: int) -> list[int]:
    if n <= size:
        return [(n - size) // 2]
    starts = list(range(0, n - size + 1, size))
    if starts[-1] != n - size:
        starts.append(n - size)
    return starts


# --------------------------------------------------------------------------- training


def _normaliser(source: SlideSource, slide_ids) -> tuple[list[float], list[float], list[int]]:
    """Per-channel mean/std of the codes over tissue cells of the training slides (streamed),
    and the number of tissue cells of each slide."""
    total = sq = None
    n = 0
    counts = []
    for sid in slide_ids:
        codes, _ = source.bag(sid)
        counts.append(len(codes))
        codes = codes.astype(np.float64)
        total = codes.sum(0) if total is None else total + codes.sum(0)
        sq = (codes**2).sum(0) if sq is None else sq + (codes**2).sum(0)
        n += len(codes)
    if not n:
        raise NicError(f"{source.store}: the training slides hold no tissue cells")
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0)) + 1e-6
    std[std < 1e-3] = 1.0  # constant channels stay unscaled
    return mean.tolist(), std.tolist(), counts


def _class_weights(task: str, target: np.ndarray, n_classes: int):
    import torch

    if task not in ("binary", "multiclass"):
        return None
    counts = np.bincount(target.astype(int), minlength=n_classes).astype(float)
    weights = np.where(counts > 0, len(target) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def fit(model: str, task: str, source: SlideSource, slide_ids: list[str], targets: dict,
        spec: dict, params: dict, store_info: dict | None = None) -> SlideModel:
    """Train ``model`` on the slides ``slide_ids`` (targets from :func:`encode_targets`)."""
    import torch

    from models.classifiers import build_model, n_outputs_for

    params = resolve_params(model, params)
    torch.manual_seed(params["seed"])
    rng = np.random.default_rng(params["seed"])
    device = _device()
    mean, std, counts = _normaliser(source, slide_ids)
    if model != "nic-cnn" and min(counts) == 0:  # a bag model cannot pool an empty bag
        keep = [i for i, c in enumerate(counts) if c > 0]
        slide_ids = [slide_ids[i] for i in keep]
        targets = {k: np.asarray(v)[keep] for k, v in targets.items()}
    n_classes = len(spec.get("classes", [])) or 2
    n_out = n_outputs_for(task, n_classes)
    in_channels = len(mean) + (1 if model == "nic-cnn" else 0)
    module = build_model(model, in_channels, n_out, **params).to(device)
    config = dict(model=model, task=task, params=params, in_channels=in_channels, code_dim=len(mean),
                  n_outputs=n_out, norm_mean=mean, norm_std=std, target=spec,
                  trained_on=len(slide_ids), store=store_info or {})
    bundle = SlideModel(config, module)
    tensors = {k: torch.as_tensor(v) for k, v in targets.items()}
    if model == "nic-cnn":
        _fit_cnn(bundle, source, slide_ids, tensors, params, rng, device)
    elif model == "abmil":
        _fit_abmil(bundle, source, slide_ids, tensors, params, rng, device, n_classes)
    else:
        _fit_pooling(bundle, source, slide_ids, tensors, params, device, n_classes)
    bundle.module.eval()
    return bundle


def _batch_targets(tensors, index, device):
    return {k: v[index].to(device) for k, v in tensors.items()}


def _fit_cnn(bundle, source, slide_ids, tensors, params, rng, device):
    """Random tissue-centred crops, random rotation/flip, Adam with exponential lr decay."""
    import torch

    from models.classifiers import dihedral, task_loss

    task, size, steps = bundle.task, params["crop"], params["steps"]
    centres = []  # tissue cells of each slide and the cumulative tissue weights to sample them
    for sid in slide_ids:
        tissue = source.tissue(sid)
        flat = np.flatnonzero(tissue > 0)
        if len(flat) == 0:
            flat = np.array([tissue.size // 2])
        cumulative = np.cumsum(tissue.ravel()[flat].astype(float) + 1e-9)
        centres.append((flat, cumulative / cumulative[-1], tissue.shape[1]))
    target = tensors["target"].numpy()
    if task in ("binary", "multiclass"):  # class-balanced sampling of slides
        strata = [np.flatnonzero(target == c) for c in np.unique(target)]
    else:
        strata = [np.arange(len(slide_ids))]
    optimiser = torch.optim.Adam(bundle.module.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    ratio = params["lr_final_ratio"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: ratio ** (s / max(steps - 1, 1)))
    jitter = max(size // 4, 1)
    batch_size = params["batch_size"]
    bundle.module.train()
    for _ in range(steps):
        index = np.array([rng.choice(strata[rng.integers(len(strata))]) for _ in range(batch_size)])
        feats = np.empty((batch_size, len(bundle.config["norm_mean"]), size, size), np.float16)
        tissue = np.empty((batch_size, size, size), np.float32)
        for b, i in enumerate(index):
            flat, cumulative, nx = centres[i]
            cy, cx = divmod(int(flat[np.searchsorted(cumulative, rng.random())]), nx)
            cy += int(rng.integers(-jitter, jitter + 1)) - size // 2
            cx += int(rng.integers(-jitter, jitter + 1)) - size // 2
            feats[b], tissue[b] = source.crop(slide_ids[i], cy, cx, size)
        inputs = bundle.cnn_input(feats, tissue)
        batch = [dihedral(inputs[b], int(k)) for b, k in enumerate(rng.integers(8, size=batch_size))]
        outputs = bundle.module(torch.stack(batch))
        loss = task_loss(task, outputs, **_loss_targets(tensors, index, device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()


def _loss_targets(tensors, index, device, class_weight=None):
    batch = _batch_targets(tensors, index, device)
    return dict(target=batch["target"], time=batch["time"], event=batch["event"], class_weight=class_weight)


def _fit_abmil(bundle, source, slide_ids, tensors, params, rng, device, n_classes):
    """Mini-batches of whole bags (sub-sampled to max_cells), Adam, class-weighted loss."""
    import torch

    from models.classifiers import task_loss

    task = bundle.task
    weight = _class_weights(task, tensors["target"].numpy(), n_classes)
    weight = None if weight is None else weight.to(device)
    optimiser = torch.optim.Adam(bundle.module.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    batch_size, max_cells = params["batch_size"], params["max_cells"]
    bundle.module.train()
    for _ in range(params["epochs"]):
        order = rng.permutation(len(slide_ids))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            if task == "survival" and len(index) < 2:
                continue
            outputs = []
            for i in index:
                codes, _ = source.bag(slide_ids[i])
                if len(codes) > max_cells:
                    codes = codes[rng.choice(len(codes), max_cells, replace=False)]
                outputs.append(bundle.module(bundle.bag_input(codes)))
            loss = task_loss(task, torch.cat(outputs), **_loss_targets(tensors, index, device, weight))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()


def _fit_pooling(bundle, source, slide_ids, tensors, params, device, n_classes):
    """Pool each slide once (parameter-free), then full-batch Adam on the linear head."""
    import torch

    from models.classifiers import task_loss

    task = bundle.task
    with torch.no_grad():
        pooled = torch.stack([bundle.module.pool(bundle.bag_input(source.bag(sid)[0])) for sid in slide_ids])
    weight = _class_weights(task, tensors["target"].numpy(), n_classes)
    weight = None if weight is None else weight.to(device)
    optimiser = torch.optim.Adam(bundle.module.linear.parameters(), lr=params["lr"],
                                 weight_decay=params["weight_decay"])
    index = np.arange(len(slide_ids))
    targets = _loss_targets(tensors, index, device, weight)
    for _ in range(params["epochs"]):
        loss = task_loss(task, bundle.module.linear(pooled), **targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


# --------------------------------------------------------------------------- fold tasks


def run_fold(store, run_dir, fold, train_ids, test_ids, labels_records, model, task, spec, params,
             store_info=None) -> dict:
    """One Dask task: train on ``train_ids``, save weights, predict ``test_ids``.

    ``fold`` is an int (cross-validation fold, weights in RUN_DIR/folds/fold-K) or "final"
    (all slides, weights in RUN_DIR). Returns small results: prediction rows, metrics and
    which worker ran it and when.
    """
    import torch

    from pipeline.classify.metrics import task_metrics

    started = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers share the cores
    try:
        labels = pd.DataFrame.from_records(labels_records).set_index("slide_id")
        params = dict(params, seed=int(params.get("seed", 0)) + (0 if fold == "final" else 1000 * (int(fold) + 1)))
        source = SlideSource(store, params.get("cache_mb", 1024))
        train = labels.loc[list(train_ids)].reset_index()
        bundle = fit(model, task, source, list(train_ids), encode_targets(train, spec), spec, params, store_info)
        bundle.config["fold"] = fold
        directory = Path(run_dir) if fold == "final" else Path(run_dir) / "folds" / f"fold-{fold}"
        bundle.save(directory)
        rows = []
        if test_ids:
            test = labels.loc[list(test_ids)].reset_index()
            encoded = encode_targets(test, spec)
            for i, sid in enumerate(test_ids):
                row = {"slide_id": sid, "fold": fold}
                row.update({c: test.at[i, c] for c in ("label", "group", "time", "event") if c in test.columns})
                row["target"] = encoded["target"][i].item() if task != "regression" else float(test.at[i, "label"])
                row.update(bundle.predict_row(source, sid))
                rows.append(row)
        metrics = task_metrics(task, pd.DataFrame(rows), spec.get("classes")) if rows else {}
    finally:
        torch.set_num_threads(threads)
    return dict(fold=fold, predictions=rows, metrics=metrics, worker=_worker_address(),
                pid=os.getpid(), start=started, end=time.time(), weights=str(directory / "model.safetensors"))


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "local"


# --------------------------------------------------------------------------- the task graph


def _store_info(source: SlideSource, slide_ids) -> dict:
    """Encoder and geometry of the store; NicError when the slides do not share a code size."""
    dims = {}
    for sid in slide_ids:
        meta = source.meta(sid)
        dims.setdefault(meta["shape"][0], sid)
    if len(dims) > 1:
        raise NicError(f"{source.store}: slides have different code sizes {sorted(dims)} "
                       f"(e.g. {list(dims.values())[:2]}); compress the cohort with one encoder")
    attrs = source.meta(slide_ids[0])["attrs"]
    keep = ("encoder", "encoder_sha256", "mpp", "patch_size", "stride")
    return {k: attrs[k] for k in keep if k in attrs} | {"code_dim": next(iter(dims))}


def _cohort(store, labels, task) -> tuple[pd.DataFrame, list[str]]:
    """Labels of the complete slides in the store; NicError naming labelled slides not in it."""
    frame = load_labels(labels, task)
    available = set(list_store_slides(store))
    missing = [s for s in frame["slide_id"] if s not in available]
    if missing:
        raise NicError(f"{store}: {len(missing)} labelled slide(s) not complete in the store "
                       f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                       "compress them or drop them from the labels CSV")
    return frame.reset_index(drop=True), sorted(available - set(frame["slide_id"]))


def train_cohort(store, labels, out, model: str = "nic-cnn", task: str = "binary", folds: int = 5,
                 client=None, scheduler=None, scheduler_file=None, workers=None,
                 params: dict | None = None, seed: int = 0) -> dict:
    """Cross-validate ``model`` on a compressed cohort and train the final model; returns metrics.

    ``labels`` is a CSV path or a DataFrame. Each fold and the final model are Dask tasks on
    ``client`` (or on a cluster from :func:`connect`). Writes the run directory ``out``.
    """
    params = resolve_params(model, {**(params or {}), "seed": seed})
    frame, unlabelled = _cohort(store, labels, task)
    spec = target_spec(frame, task)
    slide_ids = frame["slide_id"].tolist()
    info = _store_info(SlideSource(store, 0), slide_ids)
    fold_of = assign_folds(frame, task, folds, seed) if folds >= 2 else np.full(len(frame), -1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = frame.to_dict("records")
    token = uuid.uuid4().hex[:8]
    if client is None:
        with connect(scheduler, scheduler_file, workers) as own:
            results = _run_graph(own, store, out, model, task, spec, params, info, slide_ids, fold_of, records, token)
    else:
        results = _run_graph(client, store, out, model, task, spec, params, info, slide_ids, fold_of, records, token)
    return _write_outputs(out, model, task, spec, params, info, results, unlabelled, folds)


def _run_graph(client, store, out, model, task, spec, params, info, slide_ids, fold_of, records, token,
               progress=True):
    from distributed import as_completed
    from tqdm.auto import tqdm

    resources = gpu_resources(client)
    futures = []
    jobs = [(int(k), [s for s, f in zip(slide_ids, fold_of) if f != k], [s for s, f in zip(slide_ids, fold_of) if f == k])
            for k in sorted(set(fold_of.tolist())) if k >= 0]
    jobs.append(("final", slide_ids, []))
    for fold, train_ids, test_ids in jobs:
        key = f"train-{'final' if fold == 'final' else f'fold-{fold}'}-{model}-{token}"
        futures.append(client.submit(run_fold, str(store), str(out), fold, train_ids, test_ids, records, model,
                                     task, spec, params, info, key=key, pure=False, resources=resources))
    with tqdm(total=len(futures), desc=f"{model} folds + final model", unit="task", disable=not progress) as bar:
        for _ in as_completed(futures):
            bar.update(1)
    return [future.result() | {"key": future.key} for future in futures]


def _write_outputs(out, model, task, spec, params, info, results, unlabelled, folds) -> dict:
    from pipeline.classify.metrics import json_safe, summarize_folds, task_metrics

    fold_results = [r for r in results if r["fold"] != "final"]
    rows = [row for r in fold_results for row in r["predictions"]]
    oof = pd.DataFrame(rows)
    if len(oof):
        oof = oof.sort_values("slide_id").reset_index(drop=True)
        oof.to_csv(out / "oof_predictions.csv", index=False)
    metrics = {
        "model": model, "task": task, "folds": folds, "n_slides": int(sum(len(r["predictions"]) for r in fold_results)),
        "classes": spec.get("classes"), "store": info, "params": params,
        "per_fold": [dict(r["metrics"], fold=r["fold"]) for r in fold_results],
        "mean_over_folds": summarize_folds([r["metrics"] for r in fold_results]),
        "pooled": task_metrics(task, oof, spec.get("classes")) if len(oof) else {},
        "final_model": "model.safetensors",
        "unlabelled_slides_in_store": len(unlabelled),
    }
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    timeline = [{k: r[k] for k in ("key", "fold", "worker", "pid", "start", "end")} for r in results]
    (out / "tasks.json").write_text(json.dumps(timeline, indent=2))
    metrics["tasks"] = timeline
    return metrics


# --------------------------------------------------------------------------- prediction


def check_store_matches(bundle: SlideModel, source: SlideSource, slide_id: str) -> None:
    """NicError when a slide was compressed with another encoder or code size than the model's."""
    meta = source.meta(slide_id)
    trained = bundle.config.get("store", {})
    if meta["shape"][0] != bundle.config["code_dim"]:
        raise NicError(f"{source.store}: slide {slide_id!r} has {meta['shape'][0]} codes per cell, the model "
                       f"expects {bundle.config['code_dim']}; compress with the encoder the model was trained on")
    enc, want = meta["attrs"].get("encoder"), trained.get("encoder")
    if enc and want and enc != want:
        raise NicError(f"{source.store}: slide {slide_id!r} was compressed with {enc!r}, the model was trained "
                       f"on {want!r}; recompress with {want!r}")


def predict_cohort(store, run_dir, out=None, slide_ids=None) -> pd.DataFrame:
    """Score the complete slides of ``store`` (or ``slide_ids``) with the final model of ``run_dir``.

    Writes ``out`` (CSV: slide_id + score columns) when given; returns the table.
    """
    import torch

    bundle = SlideModel.load(run_dir)
    params = bundle.config["params"]
    source = SlideSource(store, params.get("cache_mb", 1024))
    slide_ids = list(slide_ids) if slide_ids is not None else list_store_slides(store)
    if not slide_ids:
        raise NicError(f"{store}: no complete slides to score")
    rows = []
    with torch.no_grad():
        for sid in slide_ids:
            check_store_matches(bundle, source, sid)
            rows.append({"slide_id": sid, **bundle.predict_row(source, sid)})
            source._cache.clear()  # one slide at a time
            source._cached_bytes = 0
    frame = pd.DataFrame(rows)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False)
    return frame


def metrics_summary(metrics: dict) -> str:
    """A one-line human summary of train_cohort's metrics for the CLI."""
    pooled = {k: v for k, v in metrics.get("pooled", {}).items() if isinstance(v, float) and not math.isnan(v)}
    parts = [f"{k}={v:.3f}" for k, v in pooled.items()]
    return f"{metrics['model']} {metrics['task']}, {metrics['n_slides']} slides, {metrics['folds']} folds: " + (
        ", ".join(parts) if parts else "no cross-validation metrics")
