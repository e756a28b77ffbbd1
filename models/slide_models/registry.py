"""The slide-model registry (timm-style): every slide-level head is one registered entry.

An entry says everything the pipeline needs to know about a head, so pipeline code asks the
entry (or the module it builds) and never branches on a model's name:

* ``build(in_channels, n_outputs, **params)`` -> ``torch.nn.Module`` (unknown params ignored);
* ``defaults``: its hyper-parameters (``nic train --param KEY=VALUE`` overrides them);
* ``input``: what it reads. ``"grid"``: crops of the compressed grid, (n, C+1, H, W) with the
  tissue fraction as the last channel, ``forward`` -> (n, n_out); a slide larger than a crop is
  scored as the mean over a tiling of crops, or their maximum where the module sets
  ``crop_pooling = "max"`` (heads whose output is a maximum over positions); ``"bag"``: the
  codes of the tissue cells of one slide, (n_cells, C), ``forward`` -> (1, n_out);
* ``scores``: how a slide's score comes out (one sentence, for reports);
* ``explanation``: what its heatmap shows. Grid modules implement ``relevance(x, output_index)``
  -> (H, W) for one crop (C+1, H, W); bag modules implement ``instance_scores(bag,
  output_index)`` -> (n_cells,). A bag module that summarises a bag without parameters may also
  expose ``pool(bag)`` and ``classify(pooled)``, and training then pools each slide once. A bag
  module with a second training loss (CLAM's instance loss) implements ``forward_extras(bag)`` ->
  (outputs, extras), ``auxiliary_loss(extras, target, task)`` -> scalar (or None) and
  ``auxiliary_weight`` w; training minimises (1 - w) task loss + w auxiliary loss
  (:func:`nic_models.slide_models.tasks.bag_loss`).

Adding a head means one file that defines the module and calls :func:`register_slide_model`,
plus its import in ``models/slide_models/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from nic_models.errors import NicError

INPUTS = ("grid", "bag")
# What each input kind's training loop reads from the params (beyond the model's own).
REQUIRED = {
    "grid": ("crop", "steps", "batch_size", "lr", "lr_final_ratio", "weight_decay"),
    "bag": ("epochs", "lr", "weight_decay"),
}

_REGISTRY: dict[str, "SlideModelSpec"] = {}

DEFAULT_SLIDE_MODEL = "abmil"
"""The slide model of ``nic train``, ``nic.train()`` and ``nic demo`` when none is named: it trains
in minutes on a laptop CPU (``docs/classify.md``); nic-cnn needs a GPU to be quick."""


class UnknownSlideModel(NicError, ValueError):
    """A slide-model name that is not registered."""


@dataclass(frozen=True)
class SlideModelSpec:
    """One registered slide-level head (see the module docstring for each field)."""

    name: str
    build: Callable
    input: str
    defaults: dict = field(default_factory=dict)
    scores: str = ""
    explanation: str = ""
    description: str = ""

    def create(self, in_channels: int, n_outputs: int, **params):
        """The torch module with ``params`` (defaults filled in; unknown keys ignored)."""
        return self.build(in_channels, n_outputs, **{**self.defaults, **params})


def register_slide_model(name: str, *, input: str, defaults: dict, scores: str = "", explanation: str = "",
                         description: str = "", build: Callable | None = None, overwrite: bool = False):
    """Register ``build`` under ``name``; used as ``@register_slide_model(name, ...)`` on the
    build function, or called with ``build=``. Returns the build function (decorator) or the spec."""
    if input not in INPUTS:
        raise ValueError(f"{name}: input must be one of {INPUTS}, not {input!r}")
    missing = [k for k in REQUIRED[input] if k not in defaults]
    if missing:
        raise ValueError(f"{name}: defaults of a {input} model need {', '.join(missing)}")

    def add(fn: Callable):
        if name in _REGISTRY and not overwrite and _REGISTRY[name].build is not fn:
            raise ValueError(f"slide model {name!r} is already registered")
        _REGISTRY[name] = SlideModelSpec(name, fn, input, dict(defaults), scores, explanation, description)
        return fn

    if build is None:
        return add
    add(build)
    return _REGISTRY[name]


def list_slide_models() -> list[str]:
    """Names of the registered slide models, in registration order."""
    return list(_REGISTRY)


def get_slide_model_spec(model) -> SlideModelSpec:
    """The entry of ``model`` (a name, or an entry, returned as is); UnknownSlideModel otherwise."""
    if isinstance(model, SlideModelSpec):
        return model
    if model not in _REGISTRY:
        raise UnknownSlideModel(f"unknown model {model!r}: choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[model]


def create_slide_model(model, in_channels: int, n_outputs: int, **params):
    """Build the registered model ``model`` (name or entry) with ``params`` over its defaults."""
    return get_slide_model_spec(model).create(in_channels, n_outputs, **params)
