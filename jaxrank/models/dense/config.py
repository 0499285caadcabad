"""Model and loss configs of the dense one-stage family (RetinaNet, ATSS) and their checks.

``check_model_config`` returns the hashable :class:`DetectorStatic` and ``check_loss_config``
the hashable :class:`LossSettings`: the detector keeps both, so the loss never re-reads a
config while it is traced.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrank import losses, ops
from jaxrank.losses import parameterized
from jaxrank.models.resnet import check_backbone_config
from jaxrank.validation import ConfigError, Section

DETECTORS = ("retinanet", "atss")
ASSIGNERS = ("max_iou", "atss")
ATSS_TOPK = 9


def default_model_config(name: str = "retinanet") -> ml_collections.ConfigDict:
  """All model fields, with the published anchors of ``name``.

  ``'retinanet'``: 9 anchors per location (ratios 0.5/1/2, octave base 4, 3 scales), FPN
  extra levels from C5. ``'atss'``: RS-ATSS's 3 anchors per location (ratio 1, octave base
  4, 3 scales), extra levels from P5, GroupNorm head with per-level scales.
  """
  if name not in DETECTORS:
    raise ConfigError(f"config key 'model.name' must be one of {DETECTORS}, got {name!r}")
  return ml_collections.ConfigDict({
      "name": name,
      "backbone": "resnet50",
      "norm": "frozen_bn",
      "frozen_stages": 1,
      "pretrained": "",
      "image_size": 512,
      "num_classes": 80,
      "fpn_channels": 256,
      "min_level": 3,
      "max_level": 7,
      "head_convs": 4,
      "head_channels": 256,
      "prior_prob": 0.01,
      "anchor_ratios": (0.5, 1.0, 2.0) if name == "retinanet" else (1.0,),
      "octave_base_scale": 4.0,
      "scales_per_octave": 3,
      "box_stds": (0.1, 0.1, 0.2, 0.2),
      "dtype": "float32",
  })


MODEL_FIELDS = tuple(default_model_config().keys())


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class DetectorStatic:
  """Hashable static description used by the losses (a pytree without leaves, so it can be
  closed over, passed to ``jit`` or marked static)."""
  num_classes: int
  image_size: int
  strides: tuple
  anchor_ratios: tuple
  octave_base_scale: float
  scales_per_octave: int
  box_stds: tuple
  num_anchors_per_level: tuple

  @property
  def anchors(self) -> np.ndarray:
    """``float32 [A, 4]`` xyxy anchors (cached, read-only)."""
    return _anchors(self.image_size, self.strides, self.anchor_ratios, self.octave_base_scale,
                    self.scales_per_octave)[0]

  @property
  def level_index(self) -> np.ndarray:
    """``int32 [A]`` FPN level (0-based) of every anchor."""
    return _anchors(self.image_size, self.strides, self.anchor_ratios, self.octave_base_scale,
                    self.scales_per_octave)[1]

  def decode(self, box_deltas):
    """xyxy boxes ``[..., A, 4]`` from deltas ``[..., A, 4]`` (mmdet's delta coder)."""
    return ops.decode_boxes(jnp.asarray(self.anchors), box_deltas, stds=self.box_stds)


@functools.lru_cache(maxsize=16)
def _anchors(image_size, strides, ratios, octave_base_scale, scales_per_octave):
  anchors, levels = ops.generate_anchors(image_size, strides=strides, ratios=ratios,
                                         octave_base_scale=octave_base_scale,
                                         scales_per_octave=scales_per_octave)
  anchors.setflags(write=False)
  levels.setflags(write=False)
  return anchors, levels


def check_model_config(config) -> DetectorStatic:
  """Checks every field (:class:`ConfigError` naming ``'model.FIELD'``); returns the static
  info."""
  model = Section(config, "model")
  model.fields(MODEL_FIELDS)
  model.choice("name", DETECTORS)
  check_backbone_config(model)
  image_size = model.integer("image_size", min=32)
  num_classes = model.integer("num_classes", min=1)
  model.integer("fpn_channels", min=1)
  model.integer("min_level", min=3, max=3)
  max_level = model.integer("max_level", min=5, max=7)
  model.integer("head_convs", min=0)
  model.integer("head_channels", min=1)
  model.number("prior_prob", above=0.0, below=1.0)
  ratios = model.numbers("anchor_ratios", above=0.0)
  octave_base_scale = model.number("octave_base_scale", above=0.0)
  scales_per_octave = model.integer("scales_per_octave", min=1)
  stds = model.numbers("box_stds", length=4, above=0.0)
  strides = tuple(2 ** level for level in range(3, max_level + 1))
  sizes = ops.num_anchors_per_level(image_size, strides=strides, ratios=ratios,
                                    scales_per_octave=scales_per_octave)
  return DetectorStatic(num_classes, image_size, strides, ratios, octave_base_scale,
                        scales_per_octave, stds, tuple(int(n) for n in sizes))


# ----------------------------------------------------------------------------------------
# Loss recipes.


class Recipe(NamedTuple):
  """Published settings of one loss recipe."""
  detector: str
  assigner: str
  cls_loss: str            # focal | ap | alrp | rank_sort | bucketed_rank_sort | bucketed_ap | pap
  delta: float | None
  box_loss: str            # smooth_l1 | giou | weighted_giou | alrp | pap
  balance: str             # fixed | value_ratio | self_balance
  box_weight: float
  beta: float = 1.0
  box_mean_over_coords: bool = False


RECIPES = {
    "focal_smooth_l1": Recipe("retinanet", "max_iou", "focal", None, "smooth_l1", "fixed", 1.0,
                              beta=0.11),
    "focal_giou": Recipe("retinanet", "max_iou", "focal", None, "giou", "fixed", 2.0),
    "ap_smooth_l1": Recipe("retinanet", "max_iou", "ap", 1.0, "smooth_l1", "fixed", 1.0, beta=1.0,
                           box_mean_over_coords=True),
    "alrp": Recipe("retinanet", "max_iou", "alrp", 1.0, "alrp", "self_balance", 1.0),
    "rank_sort": Recipe("atss", "atss", "rank_sort", 0.5, "weighted_giou", "value_ratio", 1.0),
    "bucketed_rank_sort": Recipe("atss", "atss", "bucketed_rank_sort", 0.5, "weighted_giou",
                                 "value_ratio", 1.0),
    "bucketed_ap": Recipe("atss", "atss", "bucketed_ap", 1.0, "weighted_giou", "fixed", 2.0),
    "pap": Recipe("retinanet", "max_iou", "pap", None, "pap", "fixed", 0.0),
}
LOSS_NAMES = tuple(RECIPES)


def default_loss_config(name: str = "focal_smooth_l1") -> ml_collections.ConfigDict:
  """All loss fields; ``None`` means the published value of the recipe ``name``.

  Fields: ``name``; ``delta`` (smoothing of the ranking losses); ``assigner`` ('max_iou' or
  'atss'); ``max_positives_per_image`` (sizes the ranking losses' static positive slots: a
  group of ``b`` images gets ``b * min(this, anchors, max_boxes * 9 * levels for ATSS)``; more
  positives give a NaN loss); ``alrp_period`` (self-balance period in steps; 0 = one epoch, set
  by the trainer); ``alrp_initial_weight``; ``box_loss_weight`` (a number replaces the
  published balance by a fixed weight); ``ranking_groups`` (1 = one ranking over the batch;
  G = G groups ranked separately, as G devices); ``pap_preset`` (PAP: a name in
  :data:`jaxrank.losses.PRESETS`, default 'retinanet'); ``pap_theta`` (PAP: 41 numbers in
  [0, 1] as searched, see :func:`jaxrank.losses.params_from_theta`; replaces the preset);
  ``pap_top_k`` (PAP: rows of the loss, the published 1e5).
  """
  if name not in RECIPES:
    raise ConfigError(f"config key 'loss.name' must be one of {LOSS_NAMES}, got {name!r}")
  return ml_collections.ConfigDict({
      "name": name,
      "delta": None,
      "assigner": None,
      "max_positives_per_image": 1000,
      "alrp_period": 0,
      "alrp_initial_weight": 50.0,
      "box_loss_weight": None,
      "ranking_groups": 1,
      "pap_preset": "retinanet",
      "pap_theta": None,
      "pap_top_k": 100_000,
  })


LOSS_FIELDS = tuple(default_loss_config().keys())


def recipe_model_config(name: str) -> ml_collections.ConfigDict:
  """The model config of the detector that recipe ``name`` was published with.

  Anchors per location and box coder stds: focal + smooth L1 (mmdet v1 RetinaNet): 9, stds 1;
  focal + GIoU (PAP repo): 6 (ratios 0.5/1/2, 2 scales), stds 1; AP Loss, aLRP (the max-IoU
  config) and PAP RetinaNet: 6, stds (0.1, 0.1, 0.2, 0.2); RS, bucketed RS and bucketed AP
  ATSS: 3 (ratio 1, 3 scales), stds (0.1, 0.1, 0.2, 0.2).
  """
  if name not in RECIPES:
    raise ConfigError(f"config key 'loss.name' must be one of {LOSS_NAMES}, got {name!r}")
  config = default_model_config(RECIPES[name].detector)
  if name in ("focal_smooth_l1", "focal_giou"):
    config.box_stds = (1.0, 1.0, 1.0, 1.0)
  if name in ("focal_giou", "ap_smooth_l1", "alrp", "pap"):
    config.scales_per_octave = 2
  return config


class LossSettings(NamedTuple):
  """A checked loss config with the recipe's published values filled in (hashable)."""
  name: str
  recipe: Recipe
  assigner: str
  delta: float | None
  max_positives_per_image: int
  alrp_period: int
  fixed_weight: float | None
  groups: int
  pap_top_k: int

  @property
  def self_balanced(self) -> bool:
    """aLRP's self-balance weight is in use (the loss state is a ``SelfBalanceState``)."""
    return self.recipe.balance == "self_balance" and self.fixed_weight is None


def check_loss_config(loss_config) -> LossSettings:
  """Checks ``loss_config`` (:class:`ConfigError` naming ``'loss.FIELD'``) and fills in the
  recipe's published values."""
  loss = Section(loss_config, "loss")
  loss.fields(LOSS_FIELDS)
  name = loss.choice("name", LOSS_NAMES)
  recipe = RECIPES[name]
  assigner = recipe.assigner if loss_config.assigner is None else loss.choice("assigner",
                                                                               ASSIGNERS)
  delta = recipe.delta
  if loss_config.delta is not None:
    if recipe.delta is None:
      raise loss.error("delta", f"must be None for {name!r} (it has no delta)")
    positive_only = recipe.cls_loss in ("ap", "alrp")
    delta = (loss.number("delta", above=0.0) if positive_only else loss.number("delta", min=0.0))
  max_pos = loss.integer("max_positives_per_image", min=1)
  period = loss.integer("alrp_period", min=0)
  loss.number("alrp_initial_weight", above=0.0)
  fixed = loss.optional_number("box_loss_weight", min=0.0)
  if fixed is None and recipe.balance == "fixed":
    fixed = recipe.box_weight
  groups = loss.integer("ranking_groups", min=1)
  top_k = loss.integer("pap_top_k", min=1)
  if recipe.cls_loss == "pap":
    if loss_config.box_loss_weight is not None:
      raise loss.error("box_loss_weight", "must be None for 'pap' (PAP is the only loss; the "
                                          "box branch's gradient scale is part of the PAP "
                                          "parameters)")
    pap_theta(loss_config)
  return LossSettings(name, recipe, assigner, delta, max_pos, period, fixed, groups, top_k)


def pap_theta(loss_config) -> tuple[float, ...] | None:
  """The checked ``pap_theta`` (None when unset; then ``pap_preset`` is checked)."""
  loss = Section(loss_config, "loss")
  if loss_config.pap_theta is None:
    loss.choice("pap_preset", tuple(losses.PRESETS))
    return None
  return loss.numbers("pap_theta", length=parameterized.NUM_SEARCH_PARAMS, min=0.0,
                      max=1.0)


def pap_params(loss_config) -> losses.PAPParams:
  """The PAP functions of ``loss_config`` (``pap_theta`` if set, else ``pap_preset``) as
  float32 arrays."""
  theta = pap_theta(loss_config)
  params = (losses.PRESETS[loss_config.pap_preset] if theta is None
            else losses.params_from_theta(jnp.asarray(theta, jnp.float32)))
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def init_loss_state(loss_config):
  """aLRP's :class:`jaxrank.losses.SelfBalanceState`, PAP's :class:`jaxrank.losses.PAPParams`
  (constant during training); an empty dict for the other recipes."""
  settings = check_loss_config(loss_config)
  if settings.recipe.cls_loss == "pap":
    return pap_params(loss_config)
  if settings.self_balanced:
    return losses.alrp_self_balance_init(float(loss_config.alrp_initial_weight))
  return {}
