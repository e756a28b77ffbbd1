"""Distil any registered encoder (the teacher) into a fast NIC CNN (the student).

A teacher such as nic-mtl-v3 (an EfficientNet-Lite0 trunk) or a foundation model gives better
codes than the 4-layer NIC CNN but costs 10-100x more per patch. The student learns to reproduce
the teacher's codes on the tiles of a training config (every task's tiles, labels unused):

* fixed patches: a ``grid x grid`` set of crops per tile at the student's geometry (128 px at
  0.5 µm/px for NIC); the teacher sees the same field of view resampled to its own input size;
* teacher codes computed once, standardised per dimension on the training side;
* the student (its own architecture and weights, e.g. nic-mtl-v1) regresses the standardised
  codes (mean squared error, Adam), validated on the held-out tiles of every task (the split of
  ``nic train-encoder``); the best epoch is kept;
* the standardisation is folded back into the student's last linear layer, so the student
  writes codes in the teacher's own space (the teacher's probes and heads apply to them).

Deterministic on CPU for a given config, teacher and seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nic_models.licences import spdx_expression
from nic_models.multitask import card_architecture
from nic_models.registry import create_encoder, save_encoder
from nic_pipeline.encoder import tiles as T
from nic_pipeline.encoder.config import load_config, merge
from nic_pipeline.encoder.taskdata import build_task
from nic_pipeline.encoder.train import _jsonable, selected_tasks
from nic_pipeline.errors import NicError

DISTILL_DEFAULTS = {"student": "nic-mtl-v1", "grid": 2, "pcam_grid": 1, "epochs": 8, "batch": 128,
                    "lr": 3e-4, "weight_decay": 1e-4, "teacher_batch": 64}
"""Defaults of ``nic distill-encoder`` (the config's ``distill:`` block overrides them)."""


def fixed_patches(task, size: int, target_mpp: float, grid: int, teacher_size: int) -> dict:
    """Every tile of ``task`` cut into ``grid x grid`` fixed crops: student-size patches, the same
    boxes at the teacher's size, and whether each patch comes from a validation tile."""
    student, teacher, held_out = [], [], []
    val = set(task.val_idx.tolist())
    for i, image in enumerate(task.images):
        side = T.source_side(task.mpps[i], target_mpp, size)
        for box in T.grid_boxes(image.shape, side, grid):
            student.append(T.crop_resample(image, box, size))
            teacher.append(T.crop_resample(image, box, teacher_size) if teacher_size != size else None)
            held_out.append(i in val)
    return {"student": student, "teacher": teacher, "held_out": held_out}


def teacher_codes(teacher, patches: list[np.ndarray], batch: int) -> np.ndarray:
    """The teacher's codes of uint8 patches, in batches, float32."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(patches), batch):
            out.append(teacher(np.stack(patches[start:start + batch])).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, teacher.spec.code_dim), np.float32)


def last_linear(net: nn.Module) -> nn.Linear:
    """The student's final linear layer (where the standardisation is folded back)."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NicError("the student has no linear output layer to write the teacher's code space")
    return linears[-1]


def fold_standardisation(layer: nn.Linear, mean: np.ndarray, std: np.ndarray) -> None:
    """Make ``layer`` output ``y * std + mean``: standardised codes back into the teacher's space."""
    with torch.no_grad():
        s, m = torch.from_numpy(std).to(layer.weight), torch.from_numpy(mean).to(layer.weight)
        layer.weight.mul_(s[:, None])
        layer.bias.mul_(s).add_(m)


def code_agreement(pred: np.ndarray, target: np.ndarray) -> dict:
    """How well student codes match standardised teacher codes: R² over all dimensions, mean cosine."""
    ss_res = float(((pred - target) ** 2).sum())
    ss_tot = float(((target - target.mean(0)) ** 2).sum()) or 1.0
    cos = (pred * target).sum(1) / (np.linalg.norm(pred, axis=1) * np.linalg.norm(target, axis=1) + 1e-9)
    return {"r2": 1.0 - ss_res / ss_tot, "cosine": float(cos.mean())}


def _predict(student, x: np.ndarray, batch: int = 512) -> np.ndarray:
    student.eval()
    with torch.inference_mode():
        out = [student(x[s:s + batch]).float().numpy() for s in range(0, len(x), batch)]
    student.train()
    return np.concatenate(out)


def distill_encoder(config_path: str | Path, teacher: str, out_dir: str | Path, *, name: str | None = None,
                    data_root: str | Path | None = None, overrides: dict | None = None,
                    progress: bool = True, command: str | None = None) -> dict:
    """Train a student encoder on ``teacher``'s codes of the config's tiles; write weights + card.

    Returns the card. ``overrides`` is merged into the config (``{"distill": {"epochs": 2}}``).
    """
    t_start = time.time()
    config = load_config(config_path, data_root)
    config["distill"] = merge(DISTILL_DEFAULTS, config.get("distill") or {})
    if overrides:
        config = merge(config, overrides)
    d, seed = config["distill"], int(config["seed"])
    size, target_mpp = int(config["patch_size"]), float(config["target_mpp"])
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    teacher_enc = create_encoder(teacher, seed=seed)
    student = create_encoder(d["student"], seed=seed)
    if (student.spec.patch_size, student.spec.mpp) != (size, target_mpp):
        raise NicError(f"student {d['student']!r} takes {student.spec.patch_size} px at {student.spec.mpp} µm/px; "
                       f"the config cuts {size} px at {target_mpp} µm/px")
    if student.spec.code_dim != teacher_enc.spec.code_dim:
        raise NicError(f"student {d['student']!r} writes {student.spec.code_dim}-d codes, teacher {teacher!r} "
                       f"{teacher_enc.spec.code_dim}-d: pick a student with the teacher's code size")

    tasks = [build_task(t, config, progress=progress) for t in selected_tasks(config)]
    x, y, held = [], [], []
    for task in tasks:
        grid = int(d["pcam_grid"] if task.name == "pcam" else d["grid"])
        cut = fixed_patches(task, size, target_mpp, grid, teacher_enc.spec.patch_size)
        teacher_in = [t if t is not None else s for s, t in zip(cut["student"], cut["teacher"])]
        if progress:
            print(f"teacher codes: {task.name}, {len(teacher_in)} patches", flush=True)
        y.append(teacher_codes(teacher_enc, teacher_in, int(d["teacher_batch"])))
        x.extend(cut["student"])
        held.extend(cut["held_out"])
    x, y, held = np.stack(x), np.concatenate(y), np.asarray(held)
    train, val = ~held, held
    mean, std = y[train].mean(0), y[train].std(0) + 1e-6
    target = ((y - mean) / std).astype(np.float32)

    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(student.parameters(), lr=float(d["lr"]), weight_decay=float(d["weight_decay"]))
    train_idx, history, best, best_state = np.flatnonzero(train), [], -np.inf, None
    student.train()
    for epoch in range(int(d["epochs"])):
        order, loss_sum = rng.permutation(train_idx), 0.0
        for start in range(0, len(order), int(d["batch"])):
            pick = np.sort(order[start:start + int(d["batch"])])
            loss = nn.functional.mse_loss(student(x[pick]), torch.from_numpy(target[pick]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(pick)
        agreement = code_agreement(_predict(student, x[val]), target[val]) if val.any() else {"r2": np.nan}
        history.append({"epoch": epoch + 1, "train_mse": loss_sum / max(len(train_idx), 1), "val": agreement,
                        "elapsed_s": round(time.time() - t_start, 1)})
        if progress:
            print(f"epoch {epoch + 1}: train mse {history[-1]['train_mse']:.4f}  held-out R² "
                  f"{agreement['r2']:.3f}  cosine {agreement.get('cosine', np.nan):.3f}", flush=True)
        score = agreement["r2"] if val.any() else -history[-1]["train_mse"]
        if score > best:
            best, best_epoch = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    student.load_state_dict(best_state)
    fold_standardisation(last_linear(student.net), mean.astype(np.float32), std.astype(np.float32))
    return _write_student(student, teacher_enc, config, out_dir, name, history, best_epoch,
                          int(len(train_idx)), int(val.sum()), time.time() - t_start,
                          command or f"nic distill-encoder {config_path} --teacher {teacher} --out {out_dir}")


def student_licence(teacher, student, config: dict) -> dict:
    """The student's licence: its start point's and its teacher's terms together (SPDX ``AND``),
    and the tiles' licences beside them, as training cards have."""
    ids = []
    for spec in (teacher.spec, student.spec):
        expression = spdx_expression(spec.licence) or "NOASSERTION"
        ids += [i for i in expression.split(" AND ") if i not in ids]
    return {"spdx": " AND ".join(ids),
            "weights": f"distilled from {teacher.spec.name} ({teacher.spec.licence}), starting from "
                       f"{student.spec.name} ({student.spec.licence})",
            "data": "; ".join(sorted({s.get("licence", "unknown") for t in selected_tasks(config)
                                      for s in t["sources"]}))}


def _write_student(student, teacher, config: dict, out_dir, name: str | None, history: list, best_epoch: int,
                   n_train: int, n_val: int, seconds: float, command: str) -> dict:
    """Weights and card of the student; the card names the teacher and how well the student matches it."""
    name = name or f"{teacher.spec.name}-fast"
    spec = student.spec
    architecture, kwargs = card_architecture(student.net, spec.patch_size)
    best = next(h for h in history if h["epoch"] == best_epoch)
    card_path = save_encoder(
        student.net, out_dir, name, architecture=architecture, architecture_kwargs=kwargs,
        patch_size=spec.patch_size, mpp=spec.mpp, code_dim=spec.code_dim, normalisation=spec.normalisation,
        licence=student_licence(teacher, student, config),
        source={"distilled_from": teacher.spec.name, "teacher_sha256": teacher.weights_sha256,
                "student_init": config["distill"]["student"], "command": command},
        citation=f"Distillation of {teacher.spec.name} into the NIC CNN (Tellez et al., TPAMI 2019). "
                 f"Teacher: {teacher.spec.citation}",
        register=False,
        distillation={"best_epoch": best_epoch, "held_out": best["val"], "history": history,
                      "patches": {"train": n_train, "held_out": n_val},
                      "seconds": round(seconds, 1), "torch": torch.__version__},
        config=_jsonable(config),
    )
    return json.loads(Path(card_path).read_text())
