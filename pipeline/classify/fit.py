"""Training: one loop per input kind, chosen from the registry entry.

* ``grid``: random tissue-centred crops (a slide that fits a crop is held whole), random
  rotation/flip, class-balanced slides, Adam with exponential learning-rate decay (:func:`fit_grid`);
* ``bag``: mini-batches of whole bags (sub-sampled to ``max_cells``), class-weighted loss (plus a
  head's own auxiliary loss, e.g. CLAM's instance loss), Adam; a module with a parameter-free
  ``pool`` has each slide pooled once (:func:`fit_bag`).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from nic_models.dihedral import dihedral
from nic_models.slide_models import bag_loss, get_slide_model_spec, n_outputs_for, task_loss
from nic_pipeline.classify.bundle import SlideModel, resolve_params
from nic_pipeline.classify.source import SlideSource
from nic_pipeline.errors import NicError
from nic_pipeline.runtime.device import torch_device


def fit(model, task: str, source: SlideSource, slide_ids: list[str], targets: dict,
        spec: dict, params: dict, store_info: dict | None = None, progress=None) -> SlideModel:
    """Train ``model`` (registry name or entry) on the slides ``slide_ids`` (targets from
    :func:`nic_pipeline.classify.labels.encode_targets`). ``progress(n)`` is called after every
    :func:`training_units` unit (a step of a grid model, an epoch of a bag model)."""
    entry = get_slide_model_spec(model)
    params = resolve_params(entry, params)
    torch.manual_seed(params["seed"])
    rng = np.random.default_rng(params["seed"])
    device = torch_device()
    mean, std, counts = _normaliser(source, slide_ids)
    if entry.input == "bag" and min(counts) == 0:  # a bag model cannot pool an empty bag
        keep = [i for i, c in enumerate(counts) if c > 0]
        slide_ids = [slide_ids[i] for i in keep]
        targets = {k: np.asarray(v)[keep] for k, v in targets.items()}
    n_classes = len(spec.get("classes", [])) or 2
    n_out = n_outputs_for(task, n_classes)
    in_channels = len(mean) + (1 if entry.input == "grid" else 0)  # grid crops carry the tissue fraction
    module = entry.create(in_channels, n_out, **params).to(device)
    config = dict(model=entry.name, task=task, params=params, in_channels=in_channels, code_dim=len(mean),
                  n_outputs=n_out, norm_mean=mean, norm_std=std, target=spec,
                  trained_on=len(slide_ids), store=store_info or {},
                  training_slides=list(slide_ids), training_store=str(source.store))  # scores of these are in-sample
    bundle = SlideModel(config, module, entry)
    tensors = {k: torch.as_tensor(v) for k, v in targets.items()}
    LOOPS[entry.input](bundle, source, slide_ids, tensors, params, rng, n_classes, progress or _no_progress)
    bundle.module.eval()
    return bundle


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


def _class_weights(task: str, target: np.ndarray, n_classes: int, device):
    """Inverse-frequency class weights for classification (None otherwise)."""
    if task not in ("binary", "multiclass"):
        return None
    counts = np.bincount(target.astype(int), minlength=n_classes).astype(float)
    weights = np.where(counts > 0, len(target) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _loss_targets(tensors, index, device, class_weight=None) -> dict:
    batch = {k: v[index].to(device) for k, v in tensors.items()}
    return dict(target=batch["target"], time=batch["time"], event=batch["event"], class_weight=class_weight)


def _crop_centres(source: SlideSource, slide_ids) -> list:
    """Tissue cells of each slide, the cumulative tissue weights to sample them, the grid's shape."""
    centres = []
    for sid in slide_ids:
        tissue = source.tissue(sid)
        flat = np.flatnonzero(tissue > 0)
        if len(flat) == 0:
            flat = np.array([tissue.size // 2])
        cumulative = np.cumsum(tissue.ravel()[flat].astype(float) + 1e-9)
        centres.append((flat, cumulative / cumulative[-1], tissue.shape))
    return centres


def random_crop_origin(centres, size: int, rng) -> tuple[int, int]:
    """Top-left cell of a training crop of one slide (``centres``: its entry of _crop_centres).

    Around a tissue cell drawn by tissue weight, jittered by a quarter crop; but along an axis the
    crop can hold whole, it holds the whole grid (at a random place in the crop): a lesion is never
    cropped out of a slide that fits, so the slide's label stays true of every crop."""
    flat, cumulative, (ny, nx) = centres
    cy, cx = divmod(int(flat[np.searchsorted(cumulative, rng.random())]), nx)
    return _axis_origin(cy, ny, size, rng), _axis_origin(cx, nx, size, rng)


def _axis_origin(centre: int, n: int, size: int, rng) -> int:
    if n <= size:
        return -int(rng.integers(0, size - n + 1))
    jitter = max(size // 4, 1)
    return centre + int(rng.integers(-jitter, jitter + 1)) - size // 2


def fit_grid(bundle: SlideModel, source, slide_ids, tensors, params, rng, n_classes, progress) -> None:
    """Random tissue-centred crops, random rotation/flip, Adam with exponential lr decay."""
    task, size, steps, device = bundle.task, params["crop"], params["steps"], bundle.device
    centres = _crop_centres(source, slide_ids)
    target = tensors["target"].numpy()
    if task in ("binary", "multiclass"):  # class-balanced sampling of slides
        strata = [np.flatnonzero(target == c) for c in np.unique(target)]
    else:
        strata = [np.arange(len(slide_ids))]
    optimiser = torch.optim.Adam(bundle.module.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    ratio = params["lr_final_ratio"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: ratio ** (s / max(steps - 1, 1)))
    batch_size = params["batch_size"]
    bundle.module.train()
    for _ in range(steps):
        index = np.array([rng.choice(strata[rng.integers(len(strata))]) for _ in range(batch_size)])
        feats = np.empty((batch_size, len(bundle.config["norm_mean"]), size, size), np.float16)
        tissue = np.empty((batch_size, size, size), np.float32)
        for b, i in enumerate(index):
            feats[b], tissue[b] = source.crop(slide_ids[i], *random_crop_origin(centres[i], size, rng), size)
        inputs = bundle.grid_input(feats, tissue)
        batch = [dihedral(inputs[b], int(k)) for b, k in enumerate(rng.integers(8, size=batch_size))]
        outputs = bundle.module(torch.stack(batch))
        loss = task_loss(task, outputs, **_loss_targets(tensors, index, device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
        progress(1)


def fit_bag(bundle: SlideModel, source, slide_ids, tensors, params, rng, n_classes, progress) -> None:
    """Mini-batches of whole bags (``batch_size``, default all), sub-sampled to ``max_cells``
    (default all), class-weighted loss plus the module's auxiliary loss if it has one
    (:func:`nic_models.slide_models.tasks.bag_loss`), Adam. A module with a parameter-free ``pool``
    and a ``classify`` head has every slide pooled once, then trains the head alone."""
    task, device, module = bundle.task, bundle.device, bundle.module
    weight = _class_weights(task, tensors["target"].numpy(), n_classes, device)
    n = len(slide_ids)
    batch_size, max_cells = params.get("batch_size") or n, params.get("max_cells")
    pooled = None
    if hasattr(module, "pool") and hasattr(module, "classify"):
        with torch.no_grad():
            pooled = torch.stack([module.pool(bundle.bag_input(source.bag(sid)[0])) for sid in slide_ids])
    optimiser = torch.optim.Adam(module.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    module.train()
    for _ in range(params["epochs"]):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            if task == "survival" and len(index) < 2:
                continue
            targets = _loss_targets(tensors, index, device, weight)
            if pooled is not None:
                loss = task_loss(task, module.classify(pooled[index]), **targets)
            else:
                bags = [bundle.bag_input(_subsample(source.bag(slide_ids[i])[0], max_cells, rng)) for i in index]
                loss = bag_loss(module, task, bags, **targets)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        progress(1)


def _subsample(codes: np.ndarray, max_cells: int | None, rng) -> np.ndarray:
    """At most ``max_cells`` random cells, kept in the bag's (raster) order, which order-aware
    heads (transmil's positional encoding) read as it comes at prediction."""
    if max_cells and len(codes) > max_cells:
        return codes[np.sort(rng.choice(len(codes), max_cells, replace=False))]
    return codes


def _no_progress(_: int) -> None:
    pass


LOOPS = {"grid": fit_grid, "bag": fit_bag}
UNITS = {"grid": ("steps", "step"), "bag": ("epochs", "epoch")}


def training_units(entry, params: dict) -> tuple[int, str]:
    """How many progress units training takes, and their name: steps (grid) or epochs (bag)."""
    key, name = UNITS[entry.input]
    return int(params[key]), name


def seconds_per_unit(entry, params: dict, code_dim: int, n_train: int) -> float:
    """Measured compute time of one training unit on this machine's CPU with one thread (as a
    fold task runs): one step of random crops (grid), or ``n_train`` random bags (bag). Reading
    the store is not included, so this is a lower bound."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = entry.create(code_dim + (1 if entry.input == "grid" else 0), 1, **params).train()
        if entry.input == "grid":
            x = torch.randn(params["batch_size"], code_dim + 1, params["crop"], params["crop"])
        else:
            x = torch.randn(min(params.get("max_cells") or 4096, 4096), code_dim)
        seconds = []
        for _ in range(2):  # the first pass warms up
            start = time.perf_counter()
            module(x).sum().backward()
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return seconds[-1] * (1 if entry.input == "grid" else n_train)
