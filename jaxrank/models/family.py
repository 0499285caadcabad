"""The detector interface: all that the trainer, the evaluation, the search and the benchmarks
see of a detector.

A *detector family* (dense one-stage, two-stage, query-based, ...) owns its modules, loss
recipes, assigners and post-processing, and is used through a :class:`DetectorFamily`
registered under the ``model.name`` values it builds. The detector it builds is a Flax NNX
module with the :class:`Detector` methods:

* ``loss(batch, loss_state) -> (loss, metrics, new_loss_state)``: the training loss of a
  batch, free to use the ground truth however the family needs (assignment, sampling,
  matching, queries built from the targets);
* ``detect(images, **post) -> ops.Detections``: post-processed detections for inference.

``batch`` is the dict of :mod:`jaxrank.data`: ``image [B, S, S, 3]`` float32 (normalised,
padded), ``boxes [B, M, 4]`` xyxy pixels of the ``S x S`` frame, ``labels [B, M]`` (0-based),
``box_mask [B, M]``, ``valid [B]`` (False for padding examples) and ``image_id [B]``.

The loss state is a pytree carried by the trainer (e.g. aLRP's self-balance weight, a
sampler's or dropout's counter). A loss named ``'pap'`` keeps its PAP functions in the loss
state (the dense family: the :class:`jaxrank.losses.PAPParams` as the whole state; two-stage:
``PAPState``; query-based: ``QueryLossState.pap``), so the Parameterized AP search can ``vmap``
a training step over them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import ml_collections
from flax import nnx

from jaxrank import ops
from jaxrank.validation import ConfigError, Section

ConfigDict = ml_collections.ConfigDict


class Detector(Protocol):
  """What every family's detector module offers (see the module docstring)."""

  image_size: int
  num_classes: int

  def loss(self, batch: dict[str, jax.Array], loss_state: Any
           ) -> tuple[jax.Array, dict[str, jax.Array], Any]: ...

  def detect(self, images: jax.Array, *, score_threshold: float, max_detections: int,
             iou_threshold: float, pre_nms_top_k: int) -> ops.Detections: ...


class TrainingSetup(NamedTuple):
  """What the trainer knows when it fixes the loss config of a run."""
  num_devices: int
  steps_per_epoch: int
  per_device_ranking: bool  # ``train.ranking == 'per_device'``: one ranking per device


def no_loss_state(model_config, loss_config) -> dict:
  del model_config, loss_config
  return {}


def unchanged_loss_config(loss_config, setup: TrainingSetup):
  del setup
  return loss_config


def ranking_loss_config(loss_config, setup: TrainingSetup):
  """A copy with ``ranking_groups`` = one group per device for per-device ranking and, where
  the config has one, an ``alrp_period`` of 0 set to one epoch: the ``prepare_loss_config`` of
  the families with ranking losses."""
  loss_config = loss_config.copy_and_resolve_references()
  with loss_config.unlocked():
    if setup.per_device_ranking:
      loss_config.ranking_groups = int(setup.num_devices)
    if "alrp_period" in loss_config and int(loss_config.alrp_period) == 0:
      loss_config.alrp_period = int(setup.steps_per_epoch)
  return loss_config


@dataclasses.dataclass(frozen=True)
class DetectorFamily:
  """A detector family, as the trainer sees it.

  Attributes:
    name: the family's name (e.g. ``'dense'``).
    model_names: the ``model.name`` values it builds.
    default_model_config: ``(model_name) -> ConfigDict`` with every model field; it has
      ``name``, ``image_size`` and ``num_classes`` like every family's.
    default_loss_config: ``(loss_name) -> ConfigDict`` with every loss field (``name`` too).
    check_config: ``(model_config, loss_config) -> None``; raises
      :class:`jaxrank.validation.ConfigError` naming ``'model.FIELD'`` or ``'loss.FIELD'``.
    build: ``(model_config, loss_config, *, rngs) -> Detector`` (an ``nnx.Module``).
    init_loss_state: ``(model_config, loss_config) -> pytree``.
    prepare_loss_config: ``(loss_config, TrainingSetup) -> loss_config``, the fields the
      trainer fixes for a run (a copy; e.g. one ranking group per device).
    loss_names: the ``loss.name`` values it trains with.
    recipe_names: its published recipes (e.g. ``'rank_sort'``, ``'faster_rcnn_rank_sort'``):
      names of a model and a loss as a paper trains them; unique across families.
    recipe_config: ``(recipe_name) -> (model_config, loss_config)`` as published (model at
      full size: callers shrink it for CPU runs).
  """
  name: str
  model_names: tuple[str, ...]
  default_model_config: Callable[[str], ConfigDict]
  default_loss_config: Callable[[str], ConfigDict]
  check_config: Callable[[ConfigDict, ConfigDict], None]
  build: Callable[..., nnx.Module]
  init_loss_state: Callable[[ConfigDict, ConfigDict], Any] = no_loss_state
  prepare_loss_config: Callable[[ConfigDict, TrainingSetup], ConfigDict] = unchanged_loss_config
  loss_names: tuple[str, ...] = ()
  recipe_names: tuple[str, ...] = ()
  recipe_config: Callable[[str], tuple[ConfigDict, ConfigDict]] | None = None


_FAMILIES: dict[str, DetectorFamily] = {}
_RECIPES: dict[str, DetectorFamily] = {}


def register_family(family: DetectorFamily, *, replace: bool = False) -> DetectorFamily:
  """Makes ``family`` build its ``model_names``; a name taken by another family is an error
  unless ``replace``."""
  for model_name in family.model_names:
    other = _FAMILIES.get(model_name)
    if other is not None and other.name != family.name and not replace:
      raise ValueError(f"model name {model_name!r} is already built by family {other.name!r}")
  for recipe in family.recipe_names:
    other = _RECIPES.get(recipe)
    if other is not None and other.name != family.name and not replace:
      raise ValueError(f"recipe {recipe!r} is already published by family {other.name!r}")
  if family.recipe_names and family.recipe_config is None:
    raise ValueError(f"family {family.name!r} names recipes but has no recipe_config")
  for model_name in family.model_names:
    _FAMILIES[model_name] = family
  for recipe in family.recipe_names:
    _RECIPES[recipe] = family
  return family


def unregister_family(name: str) -> None:
  """Removes the family called ``name`` (for tests)."""
  for model_name in [m for m, f in _FAMILIES.items() if f.name == name]:
    del _FAMILIES[model_name]
  for recipe in [r for r, f in _RECIPES.items() if f.name == name]:
    del _RECIPES[recipe]


def model_names() -> tuple[str, ...]:
  """Every registered ``model.name``."""
  return tuple(_FAMILIES)


def recipe_names() -> tuple[str, ...]:
  """Every registered family's published recipes."""
  return tuple(_RECIPES)


def recipe_config(name: str) -> tuple[ConfigDict, ConfigDict]:
  """``(model_config, loss_config)`` of the published recipe ``name``."""
  if name not in _RECIPES:
    raise ConfigError(f"recipe must be one of {', '.join(_RECIPES)}; got {name!r}")
  return _RECIPES[name].recipe_config(name)


def family_of(model_config) -> DetectorFamily:
  """The family that builds ``model_config.name``."""
  name = model_config.get("name") if hasattr(model_config, "get") else None
  if name not in _FAMILIES:
    raise ConfigError(f"config key 'model.name' must be one of "
                      f"{', '.join(map(repr, _FAMILIES))}; got {name!r}")
  return _FAMILIES[name]


def default_model_config(name: str) -> ConfigDict:
  """The model fields of ``model.name = name``, from its family."""
  return family_of({"name": name}).default_model_config(name)


def check_config(model_config, loss_config) -> None:
  """Checks the ``model`` and ``loss`` sections (:class:`ConfigError` naming the field)."""
  model = Section(model_config, "model")
  model.integer("image_size", min=32)
  model.integer("num_classes", min=1)
  family_of(model_config).check_config(model_config, loss_config)


def build_detector(model_config, loss_config, *, rngs: nnx.Rngs) -> Detector:
  """The detector of ``model_config`` trained with ``loss_config`` (checked first)."""
  check_config(model_config, loss_config)
  return family_of(model_config).build(model_config, loss_config, rngs=rngs)


def init_loss_state(model_config, loss_config) -> Any:
  """The initial loss state of a run."""
  return family_of(model_config).init_loss_state(model_config, loss_config)


def prepare_loss_config(model_config, loss_config, setup: TrainingSetup):
  """The loss config with the fields the trainer fixes for a run (see
  :attr:`DetectorFamily.prepare_loss_config`)."""
  return family_of(model_config).prepare_loss_config(loss_config, setup)
