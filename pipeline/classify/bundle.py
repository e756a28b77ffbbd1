"""The saved model bundle: a trained slide model, its config, and how it reads, scores and
explains one slide.

A run directory (or RUN_DIR/folds/fold-K) holds ``config.json`` (model name, task, params,
normalisation, target spec, store info) and ``model.safetensors``. How a slide is read, scored
and explained depends only on the registry entry's ``input`` kind (``grid`` or ``bag``) and on
the module's own ``relevance`` / ``instance_scores`` methods, never on the model's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nic_models.slide_models import SlideModelSpec, get_slide_model_spec, scores_from_outputs
from nic_models.slide_models.tasks import predict_dihedral
from nic_pipeline.classify.source import SlideSource
from nic_pipeline.errors import NicError
from nic_pipeline.runtime.device import torch_device

COMMON = dict(seed=0, cache_mb=1024)


def resolve_params(model, overrides: dict | None = None) -> dict:
    """Defaults for ``model`` (name or registry entry) updated with ``overrides``; unknown keys
    are a NicError."""
    entry = get_slide_model_spec(model)
    params = {**COMMON, **entry.defaults}
    unknown = set(overrides or {}) - set(params)
    if unknown:
        raise NicError(f"unknown parameter(s) for {entry.name}: {', '.join(sorted(unknown))}; "
                       f"known: {', '.join(sorted(params))}")
    params.update(overrides or {})
    return params


@dataclass
class SlideModel:
    """A trained slide model and everything needed to apply it to a store."""

    config: dict
    module: torch.nn.Module
    entry: SlideModelSpec | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.entry is None:
            self.entry = get_slide_model_spec(self.config["model"])

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def name(self) -> str:
        return self.config["model"]

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def save(self, directory) -> Path:
        """Write model.safetensors and config.json into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(self.config, indent=2))
        return directory / "model.safetensors"

    @classmethod
    def load(cls, directory, device=None) -> "SlideModel":
        """Load a model written by :meth:`save` (RUN_DIR or RUN_DIR/folds/fold-K)."""
        directory = Path(directory)
        if not (directory / "config.json").exists() or not (directory / "model.safetensors").exists():
            raise NicError(f"{directory}: no trained model (config.json + model.safetensors); run `nic train` first")
        config = json.loads((directory / "config.json").read_text())
        entry = get_slide_model_spec(config["model"])
        module = entry.create(config["in_channels"], config["n_outputs"], **config["params"])
        module.load_state_dict(load_file(str(directory / "model.safetensors")))
        return cls(config, module.to(device or torch_device()).eval(), entry)

    # ------------------------------------------------------------ inputs

    def _norm(self):
        mean = torch.tensor(self.config["norm_mean"], dtype=torch.float32, device=self.device)
        std = torch.tensor(self.config["norm_std"], dtype=torch.float32, device=self.device)
        return mean, std

    def grid_input(self, feats: np.ndarray, tissue: np.ndarray) -> torch.Tensor:
        """Standardised codes (zero off tissue) plus the tissue fraction as an extra channel."""
        mean, std = self._norm()
        x = torch.as_tensor(feats, device=self.device).float()
        valid = (x != 0).any(dim=-3, keepdim=True)
        x = (x - mean[:, None, None]) / std[:, None, None] * valid
        t = torch.as_tensor(tissue, device=self.device).float().unsqueeze(-3)
        return torch.cat([x, t], dim=-3)

    def bag_input(self, codes: np.ndarray) -> torch.Tensor:
        """Standardised codes of a bag (n, C)."""
        mean, std = self._norm()
        return (torch.as_tensor(codes, device=self.device).float() - mean) / std

    def crop_origins(self, source: SlideSource, slide_id: str) -> list[tuple[int, int]]:
        """Test-time crops: a tiling of the grid (centred when smaller than a crop), tissue only."""
        size = self.config["params"]["crop"]
        _, ny, nx = source.shape(slide_id)
        tissue = source.tissue(slide_id)
        origins = [(y, x) for y in _axis_origins(ny, size) for x in _axis_origins(nx, size)
                   if tissue[max(y, 0):y + size, max(x, 0):x + size].sum() > 0]
        return origins or [(_axis_origins(ny, size)[0], _axis_origins(nx, size)[0])]

    # ------------------------------------------------------------ prediction

    def raw_scores(self, source: SlideSource, slide_id: str) -> np.ndarray:
        """Scores (n_out,) in model units (probabilities, standardised value, or log-risk)."""
        self.module.eval()
        with torch.no_grad():
            return _SCORES[self.entry.input](self, source, slide_id).cpu().numpy()

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
        """Per-cell relevance (ny, nx) float32, NaN off tissue, as the module explains itself
        (the entry's ``explanation``: Grad-CAM, attention, per-cell contribution...).
        Multiclass maps explain the predicted class (``scores`` from raw_scores, if at hand)."""
        if scores is None and self.task == "multiclass":
            scores = self.raw_scores(source, slide_id)
        index = int(np.argmax(scores)) if self.task == "multiclass" else 0
        self.module.eval()
        return _RELEVANCE[self.entry.input](self, source, slide_id, index)


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


def _axis_origins(n: int, size: int) -> list[int]:
    if n <= size:
        return [(n - size) // 2]
    starts = list(range(0, n - size + 1, size))
    if starts[-1] != n - size:
        starts.append(n - size)
    return starts


def _slide_bag(bundle: SlideModel, source: SlideSource, slide_id: str):
    codes, cells = source.bag(slide_id)
    if len(codes) == 0:
        raise NicError(f"{source.store}: slide {slide_id!r} has no tissue cells")
    return bundle.bag_input(codes), cells


def _grid_scores(bundle: SlideModel, source: SlideSource, slide_id: str) -> torch.Tensor:
    """The mean over the 8 rotations/flips of each crop of a tiling, combined over the crops as
    the module pools positions (``crop_pooling``: "mean", the default, or "max")."""
    size = bundle.config["params"]["crop"]
    per_crop = []
    for y0, x0 in bundle.crop_origins(source, slide_id):
        feats, tis = source.crop(slide_id, y0, x0, size)
        per_crop.append(predict_dihedral(bundle.module, bundle.grid_input(feats, tis)[None], bundle.task)[0])
    per_crop = torch.stack(per_crop)
    return per_crop.amax(0) if getattr(bundle.module, "crop_pooling", "mean") == "max" else per_crop.mean(0)


def _bag_scores(bundle: SlideModel, source: SlideSource, slide_id: str) -> torch.Tensor:
    """One forward pass over all tissue cells."""
    bag, _ = _slide_bag(bundle, source, slide_id)
    return scores_from_outputs(bundle.task, bundle.module(bag))[0]


def _grid_relevance(bundle: SlideModel, source: SlideSource, slide_id: str, index: int) -> np.ndarray:
    """``module.relevance`` of each test-time crop, averaged where crops overlap."""
    _, ny, nx = source.shape(slide_id)
    size = bundle.config["params"]["crop"]
    total = np.zeros((ny, nx), np.float64)
    count = np.zeros((ny, nx), np.float64)
    for y0, x0 in bundle.crop_origins(source, slide_id):
        feats, tis = source.crop(slide_id, y0, x0, size)
        cam = bundle.module.relevance(bundle.grid_input(feats, tis), index).detach().cpu().numpy()
        ys, ye, xs, xe = max(y0, 0), min(y0 + size, ny), max(x0, 0), min(x0 + size, nx)
        total[ys:ye, xs:xe] += cam[ys - y0:ye - y0, xs - x0:xe - x0]
        count[ys:ye, xs:xe] += 1
    valid = source.valid_cells(slide_id)
    heat = np.full((ny, nx), np.nan, np.float32)
    heat[valid] = (total / np.maximum(count, 1))[valid]
    return heat


def _bag_relevance(bundle: SlideModel, source: SlideSource, slide_id: str, index: int) -> np.ndarray:
    """``module.instance_scores`` of the tissue cells, placed on the grid."""
    _, ny, nx = source.shape(slide_id)
    heat = np.full((ny, nx), np.nan, np.float32)
    with torch.no_grad():
        bag, cells = _slide_bag(bundle, source, slide_id)
        values = bundle.module.instance_scores(bag, index)
    heat[cells[:, 0], cells[:, 1]] = values.cpu().numpy()
    return heat


_SCORES = {"grid": _grid_scores, "bag": _bag_scores}
_RELEVANCE = {"grid": _grid_relevance, "bag": _bag_relevance}
