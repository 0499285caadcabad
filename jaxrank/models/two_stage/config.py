"""Model and loss configs of the two-stage family (Faster R-CNN, Cascade R-CNN) and their checks.

``check_model_config`` returns the hashable :class:`TwoStageStatic` and ``check_loss_config``
the hashable :class:`LossSettings`; the detector keeps both, so nothing re-reads a config
while it is traced.
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

DETECTORS = ("faster_rcnn", "cascade_rcnn")
#: FPN levels P2-P6 (strides 4-64) for the RPN; the RoI extractor pools from P2-P5.
MIN_LEVEL, MAX_LEVEL = 2, 6
ROI_STRIDES = (4, 8, 16, 32)
CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


def default_model_config(name: str = "faster_rcnn") -> ml_collections.ConfigDict:
  """All model fields, with mmdet's ``faster_rcnn_r50_fpn`` / ``cascade_rcnn_r50_fpn`` values.

  ResNet-50 + FPN P2-P6 (256 channels, P6 by stride-2 max-pooling), RPN with 3 anchors per
  location (scale 8, ratios 0.5/1/2) and one 3x3 conv of 256, proposals 2000 per level before
  NMS 0.7 and 1000 after (train) / 1000 and 1000 (test), RoIAlign 7x7 from P2-P5
  (``finest_scale`` 56, 2 samples per bin: see :func:`jaxrank.ops.roi_align`), Shared2FC box
  head (two FC of 1024). Faster R-CNN: one stage at IoU 0.5, class-specific regression, stds
  (0.1, 0.1, 0.2, 0.2). Cascade R-CNN: stages at IoU 0.5 / 0.6 / 0.7 with stds
  (0.1, 0.1, 0.2, 0.2) / (0.05, 0.05, 0.1, 0.1) / (0.033, 0.033, 0.067, 0.067),
  class-agnostic regression, stage loss weights 1 / 1 / 1 (the RS and bucketed RS configs).
  ``rpn_box_stds`` is mmdet's (1, 1, 1, 1); the ranking recipes' RPN uses (0.1, 0.1, 0.2, 0.2)
  (see :func:`recipe_model_config`). ``rpn_allowed_border``: a negative value trains the RPN
  on every anchor (Faster R-CNN); ``b >= 0`` ignores anchors reaching more than ``b`` pixels
  outside the image (mmdet's ``allowed_border``).
  """
  if name not in DETECTORS:
    raise ConfigError(f"config key 'model.name' must be one of {DETECTORS}, got {name!r}")
  cascade = name == "cascade_rcnn"
  return ml_collections.ConfigDict({
      "name": name,
      "backbone": "resnet50",
      "norm": "frozen_bn",
      "frozen_stages": 1,
      "pretrained": "",
      "image_size": 800,
      "num_classes": 80,
      "fpn_channels": 256,
      "anchor_ratios": (0.5, 1.0, 2.0),
      "anchor_scale": 8.0,
      "rpn_channels": 256,
      "rpn_box_stds": (1.0, 1.0, 1.0, 1.0),
      "rpn_allowed_border": -1.0,
      "rpn_nms_iou": 0.7,
      "rpn_train_pre_nms": 2000,
      "rpn_train_post_nms": 1000,
      "rpn_test_pre_nms": 1000,
      "rpn_test_post_nms": 1000,
      "roi_output_size": 7,
      "roi_sampling_ratio": 2,
      "finest_scale": 56.0,
      "fc_channels": 1024,
      "stage_iou_thresholds": (0.5, 0.6, 0.7) if cascade else (0.5,),
      "stage_loss_weights": (1.0, 1.0, 1.0) if cascade else (1.0,),
      "stage_box_stds": CASCADE_STDS if cascade else CASCADE_STDS[:1],
      "class_agnostic": cascade,
      "dtype": "float32",
  })


MODEL_FIELDS = tuple(default_model_config().keys())


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class TwoStageStatic:
  """Hashable static description of a two-stage detector (a pytree without leaves)."""
  name: str
  num_classes: int
  image_size: int
  strides: tuple
  anchor_ratios: tuple
  anchor_scale: float
  rpn_box_stds: tuple
  rpn_allowed_border: float
  num_anchors_per_level: tuple
  rpn_nms_iou: float
  rpn_train: tuple   # (pre_nms, post_nms)
  rpn_test: tuple
  roi_output_size: int
  roi_sampling_ratio: int
  finest_scale: float
  stage_iou_thresholds: tuple
  stage_loss_weights: tuple
  stage_box_stds: tuple
  class_agnostic: bool

  @property
  def num_stages(self) -> int:
    return len(self.stage_iou_thresholds)

  @property
  def anchors(self) -> np.ndarray:
    """``float32 [A, 4]`` xyxy RPN anchors, level-major (cached, read-only)."""
    return _anchors(self.image_size, self.strides, self.anchor_ratios, self.anchor_scale)

  def decode_rpn(self, box_deltas):
    """xyxy boxes ``[..., A, 4]`` from RPN deltas ``[..., A, 4]`` (not clipped)."""
    return ops.decode_boxes(jnp.asarray(self.anchors), box_deltas, stds=self.rpn_box_stds)


@functools.lru_cache(maxsize=16)
def _anchors(image_size, strides, ratios, scale):
  anchors, _ = ops.generate_anchors(image_size, strides=strides, ratios=ratios,
                                    octave_base_scale=scale, scales_per_octave=1)
  anchors.setflags(write=False)
  return anchors


def check_model_config(config) -> TwoStageStatic:
  """Checks every field (:class:`ConfigError` naming ``'model.FIELD'``); returns the static
  info."""
  model = Section(config, "model")
  model.fields(MODEL_FIELDS)
  name = model.choice("name", DETECTORS)
  check_backbone_config(model)
  image_size = model.integer("image_size", min=64)
  num_classes = model.integer("num_classes", min=1)
  model.integer("fpn_channels", min=1)
  ratios = model.numbers("anchor_ratios", above=0.0)
  scale = model.number("anchor_scale", above=0.0)
  model.integer("rpn_channels", min=1)
  rpn_stds = model.numbers("rpn_box_stds", length=4, above=0.0)
  border = model.number("rpn_allowed_border")
  nms_iou = model.number("rpn_nms_iou", min=0.0, max=1.0)
  rpn_train = (model.integer("rpn_train_pre_nms", min=1), model.integer("rpn_train_post_nms",
                                                                         min=1))
  rpn_test = (model.integer("rpn_test_pre_nms", min=1), model.integer("rpn_test_post_nms",
                                                                      min=1))
  output_size = model.integer("roi_output_size", min=1)
  sampling_ratio = model.integer("roi_sampling_ratio", min=1)
  finest_scale = model.number("finest_scale", above=0.0)
  model.integer("fc_channels", min=1)
  ious = model.numbers("stage_iou_thresholds", above=0.0, max=1.0)
  if name == "faster_rcnn" and len(ious) != 1:
    raise model.error("stage_iou_thresholds", "must have one stage for 'faster_rcnn' (use "
                                              "'cascade_rcnn' for several)")
  weights = model.numbers("stage_loss_weights", min=0.0)
  if len(weights) != len(ious):
    raise model.error("stage_loss_weights", f"must have one weight per stage ({len(ious)}), "
                                            f"got {len(weights)}")
  stds = config.stage_box_stds
  if (isinstance(stds, (str, bytes)) or not hasattr(stds, "__len__") or len(stds) != len(ious)):
    raise model.error("stage_box_stds", f"must hold one 4-tuple per stage ({len(ious)}), got "
                                        f"{stds!r}")
  stage_stds = tuple(Section({f"stage_box_stds[{i}]": s}, "model").numbers(
      f"stage_box_stds[{i}]", length=4, above=0.0) for i, s in enumerate(stds))
  agnostic = model.boolean("class_agnostic")
  strides = tuple(2 ** level for level in range(MIN_LEVEL, MAX_LEVEL + 1))
  sizes = ops.num_anchors_per_level(image_size, strides=strides, ratios=ratios,
                                    scales_per_octave=1)
  return TwoStageStatic(name, num_classes, image_size, strides, ratios, scale, rpn_stds, border,
                        tuple(int(n) for n in sizes), nms_iou, rpn_train, rpn_test, output_size,
                        sampling_ratio, finest_scale, ious, weights, stage_stds, agnostic)


# ----------------------------------------------------------------------------------------
# Loss recipes.


class Recipe(NamedTuple):
  """Published settings of one two-stage loss recipe.

  ``loss``: ce (sampled cross-entropy baselines) | rank_sort | bucketed_rank_sort | alrp |
  pap. ``rpn_sampler``: 'random' (256 anchors per image, half positive) or 'all'.
  ``rcnn_sampler``: 'random' (512 RoIs of proposals + gt, 25% positive), 'all_with_gt' (every
  proposal and every gt box) or 'all' (every proposal). ``rpn_weight`` multiplies every RPN
  term. ``rcnn_box_loss``: the CE baselines' R-CNN box loss ('l1' on deltas or 'giou' on
  decoded boxes) and ``rcnn_box_weight`` its weight. ``rpn_error_scale``: aLRP's RPN divides
  its GIoU errors by ``2 (1 - 0.7)``. ``ranking_stds``: the RPN coder uses stds
  (0.1, 0.1, 0.2, 0.2) instead of mmdet's (1, 1, 1, 1).
  """
  loss: str
  delta: float | None
  rpn_sampler: str
  rcnn_sampler: str
  rpn_weight: float
  rcnn_box_loss: str = "giou"
  rcnn_box_weight: float = 1.0
  rpn_error_scale: float = 1.0
  ranking_stds: bool = True


RECIPES = {
    # PAP repo configs/paploss/CE+L1_fasterrcnn_r50_fpn.py (the aLRP README's "CE + SL1"): L1.
    "ce_smooth_l1": Recipe("ce", None, "random", "random", 1.0, "l1", 1.0, ranking_stds=False),
    # PAP repo configs/paploss/CE+giou_fasterrcnn_r50_fpn.py: R-CNN GIoU x 10, RPN L1.
    "ce_giou": Recipe("ce", None, "random", "random", 1.0, "giou", 10.0, ranking_stds=False),
    # BR repo configs/ranksort_loss/ranksort_loss_faster_rcnn_r50_fpn_1x_coco.py.
    "rank_sort": Recipe("rank_sort", 0.5, "all", "all_with_gt", 0.2),
    # BR repo configs/bucketed_ranking_losses/bucketed_ranksort_loss_faster_rcnn_r50_fpn_1x_coco.py.
    "bucketed_rank_sort": Recipe("bucketed_rank_sort", 0.5, "all", "all_with_gt", 0.2),
    # aLRP repo configs/alrp_loss/alrp_loss_faster_rcnn_r50_fpn_100e_coco500.py.
    "alrp": Recipe("alrp", 1.0, "all", "all", 0.2, rpn_error_scale=1.0 / 0.6),
    # PAP repo configs/paploss/paploss_fasterrcnn_r50_fpn.py: the RPN keeps the inherited
    # random sampler (256 anchors per image) and ranks only those.
    "pap": Recipe("pap", None, "random", "all", 1.0),
}
LOSS_NAMES = tuple(RECIPES)
SAMPLERS = ("random", "all", "all_with_gt")


def default_loss_config(name: str = "rank_sort") -> ml_collections.ConfigDict:
  """All loss fields; ``None`` means the published value of the recipe ``name``.

  Fields: ``name``; ``delta`` (smoothing of the ranking losses); ``rpn_weight`` (the RPN
  losses' multiplier, published 0.2 for RS and bucketed RS); ``rpn_sampler`` and
  ``rcnn_sampler`` (see :class:`Recipe`); ``rpn_num_samples`` / ``rpn_pos_fraction`` (256 /
  0.5) and ``rcnn_num_samples`` / ``rcnn_pos_fraction`` (512 / 0.25) of the random samplers;
  ``max_positives_per_image`` (static positive slots of the RPN ranking: ``b *
  min(this, anchors)`` per group; more positives give a NaN loss and a skipped step);
  ``ranking_groups`` (1 = one ranking over the batch; G = G groups ranked separately, as G
  devices); ``alrp_period`` (self-balance period in steps, 0 = one epoch, set by the
  trainer) and ``alrp_initial_weight``; ``pap_rpn_preset`` / ``pap_rcnn_preset`` (names in
  :data:`jaxrank.losses.PRESETS`) or ``pap_theta`` (82 numbers in [0, 1] as the published
  search: the RPN's 5 functions x 8, the R-CNN's 5 x 8, then the RPN and the R-CNN gradient
  scales, see :func:`jaxrank.losses.faster_rcnn_params_from_theta`); ``pap_top_k``
  (rows of each PAP loss, the published 1e5).
  """
  if name not in RECIPES:
    raise ConfigError(f"config key 'loss.name' must be one of {LOSS_NAMES}, got {name!r}")
  return ml_collections.ConfigDict({
      "name": name,
      "delta": None,
      "rpn_weight": None,
      "rpn_sampler": None,
      "rcnn_sampler": None,
      "rpn_num_samples": 256,
      "rpn_pos_fraction": 0.5,
      "rcnn_num_samples": 512,
      "rcnn_pos_fraction": 0.25,
      "max_positives_per_image": 1000,
      "ranking_groups": 1,
      "alrp_period": 0,
      "alrp_initial_weight": 50.0,
      "pap_rpn_preset": "faster_rcnn_rpn",
      "pap_rcnn_preset": "faster_rcnn_rcnn",
      "pap_theta": None,
      "pap_top_k": 100_000,
  })


LOSS_FIELDS = tuple(default_loss_config().keys())


class LossSettings(NamedTuple):
  """A checked loss config with the recipe's published values filled in (hashable)."""
  name: str
  recipe: Recipe
  delta: float | None
  rpn_weight: float
  rpn_sampler: str
  rcnn_sampler: str
  rpn_samples: tuple    # (num, pos_fraction)
  rcnn_samples: tuple
  max_positives_per_image: int
  groups: int
  alrp_period: int
  pap_top_k: int

  @property
  def classifier(self) -> str:
    """'softmax' (with a background logit: the CE baselines) or 'sigmoid'."""
    return "softmax" if self.recipe.loss == "ce" else "sigmoid"

  @property
  def random(self) -> bool:
    """A sampler draws random numbers (the loss state then carries a counter)."""
    return "random" in (self.rpn_sampler, self.rcnn_sampler)


def check_loss_config(loss_config) -> LossSettings:
  """Checks ``loss_config`` (:class:`ConfigError` naming ``'loss.FIELD'``) and fills in the
  recipe's published values."""
  loss = Section(loss_config, "loss")
  loss.fields(LOSS_FIELDS)
  name = loss.choice("name", LOSS_NAMES)
  recipe = RECIPES[name]
  delta = recipe.delta
  if loss_config.delta is not None:
    if recipe.delta is None:
      raise loss.error("delta", f"must be None for {name!r} (it has no delta)")
    delta = (loss.number("delta", above=0.0) if recipe.loss == "alrp"
             else loss.number("delta", min=0.0))
  rpn_weight = loss.optional_number("rpn_weight", min=0.0)
  rpn_sampler = (recipe.rpn_sampler if loss_config.rpn_sampler is None
                 else loss.choice("rpn_sampler", ("random", "all")))
  rcnn_sampler = (recipe.rcnn_sampler if loss_config.rcnn_sampler is None
                  else loss.choice("rcnn_sampler", SAMPLERS))
  rpn_samples = (loss.integer("rpn_num_samples", min=1),
                 loss.number("rpn_pos_fraction", min=0.0, max=1.0))
  rcnn_samples = (loss.integer("rcnn_num_samples", min=1),
                  loss.number("rcnn_pos_fraction", min=0.0, max=1.0))
  max_pos = loss.integer("max_positives_per_image", min=1)
  groups = loss.integer("ranking_groups", min=1)
  period = loss.integer("alrp_period", min=0)
  loss.number("alrp_initial_weight", above=0.0)
  top_k = loss.integer("pap_top_k", min=1)
  if recipe.loss == "pap":
    pap_theta(loss_config)
  return LossSettings(name, recipe, delta,
                      recipe.rpn_weight if rpn_weight is None else rpn_weight, rpn_sampler,
                      rcnn_sampler, rpn_samples, rcnn_samples, max_pos, groups, period, top_k)


NUM_PAP_THETA = 2 * parameterized.NUM_SEARCH_PARAMS


def pap_theta(loss_config) -> tuple[float, ...] | None:
  """The checked ``pap_theta`` (None when unset; then the two presets are checked)."""
  loss = Section(loss_config, "loss")
  if loss_config.pap_theta is None:
    loss.choice("pap_rpn_preset", tuple(losses.PRESETS))
    loss.choice("pap_rcnn_preset", tuple(losses.PRESETS))
    return None
  return loss.numbers("pap_theta", length=NUM_PAP_THETA, min=0.0, max=1.0)


def pap_params(loss_config) -> tuple[losses.PAPParams, losses.PAPParams]:
  """``(rpn, rcnn)`` PAP functions of ``loss_config`` as float32 arrays."""
  theta = pap_theta(loss_config)
  if theta is None:
    params = (losses.PRESETS[loss_config.pap_rpn_preset],
              losses.PRESETS[loss_config.pap_rcnn_preset])
  else:
    params = losses.faster_rcnn_params_from_theta(jnp.asarray(theta, jnp.float32))
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tuple(params))


class SamplerState(NamedTuple):
  """Loss state of the recipes with a random sampler: the number of batches sampled so far
  (each batch's key is ``fold_in(key(seed), count)``)."""
  count: jax.Array


class PAPState(NamedTuple):
  """PAP's loss state: the RPN's and the R-CNN's functions and the RPN sampler's counter.

  The functions are constant during training (a search vmaps a training step over them)."""
  rpn: losses.PAPParams
  rcnn: losses.PAPParams
  count: jax.Array


class AlrpState(NamedTuple):
  """aLRP's self-balance states, one per head."""
  rpn: losses.SelfBalanceState
  rcnn: losses.SelfBalanceState


def init_loss_state(loss_config):
  """The recipe's loss state: a :class:`PAPState`, aLRP's :class:`AlrpState`, a
  :class:`SamplerState` for random samplers, else ``{}``."""
  settings = check_loss_config(loss_config)
  if settings.recipe.loss == "pap":
    return PAPState(*pap_params(loss_config), jnp.zeros((), jnp.int32))
  if settings.recipe.loss == "alrp":
    weight = float(loss_config.alrp_initial_weight)
    return AlrpState(losses.alrp_self_balance_init(weight),
                     losses.alrp_self_balance_init(weight))
  if settings.random:
    return SamplerState(jnp.zeros((), jnp.int32))
  return {}


def recipe_model_config(model_name: str, loss_name: str) -> ml_collections.ConfigDict:
  """The model config that ``loss_name`` was published with on ``model_name``.

  The ranking, aLRP and PAP heads' RPN coder uses stds (0.1, 0.1, 0.2, 0.2), the CE
  baselines' (1, 1, 1, 1). The RS and bucketed RS Cascade R-CNN configs use stds
  (0.1, 0.1, 0.2, 0.2) in all three stages and ignore RPN anchors that cross the image
  border (``allowed_border=0``).
  """
  if loss_name not in RECIPES:
    raise ConfigError(f"config key 'loss.name' must be one of {LOSS_NAMES}, got {loss_name!r}")
  config = default_model_config(model_name)
  if RECIPES[loss_name].ranking_stds:
    config.rpn_box_stds = (0.1, 0.1, 0.2, 0.2)
  if model_name == "cascade_rcnn" and loss_name in ("rank_sort", "bucketed_rank_sort"):
    config.stage_box_stds = CASCADE_STDS[:1] * 3
    config.rpn_allowed_border = 0.0
  return config
