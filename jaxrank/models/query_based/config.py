"""Model and loss configs of the query-based family (Deformable DETR) and their checks.

``check_model_config`` returns the hashable :class:`QueryStatic` and ``check_loss_config`` the
hashable :class:`LossSettings`; the detector keeps both, so nothing re-reads a config while it
is traced.
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

DETECTORS = ("deformable_detr", "co_deformable_detr")
#: Auxiliary heads of Co-DETR on the encoder output: the two-stage family's RPN + RoI head
#: and an ATSS head.
AUX_HEADS = ("rpn_roi", "atss")
#: Backbone levels C3-C5 (strides 8-32); further levels by stride-2 3x3 convolutions.
BACKBONE_MIN_LEVEL = 3


def default_model_config(name: str = "deformable_detr") -> ml_collections.ConfigDict:
  """All model fields of ``name``.

  ``'deformable_detr'``: the values of Deformable DETR's ``main.py`` (R50, 300 queries).
  ResNet-50 C3-C5 projected to ``hidden_dim`` 256 by 1x1 conv + GroupNorm (32), a fourth level
  by a stride-2 3x3 conv + GroupNorm of C5 (``num_levels`` 3-6); sine position embeddings
  (normalised, 2π) plus a learned embedding per level; 6 encoder and 6 decoder layers with 8
  heads, 4 sampling points per head and level, FFN 1024, dropout 0.1 (post-norm layers, ReLU);
  300 queries; a class and a box head (3-layer MLP) on every decoder layer. ``box_refine``:
  each decoder layer refines the reference boxes of the next (own heads per layer; published
  ``--with_box_refine``). ``two_stage``: the queries' reference boxes are the top
  ``num_queries`` encoder proposals (published ``--two_stage``, used with ``box_refine``).
  ``mixed_selection``: with ``two_stage``, learned content queries and only the positions from
  the proposals (DINO's mixed query selection). ``look_forward_twice``: a layer's boxes are
  refined from the previous layer's boxes with their gradient (DINO).

  ``'co_deformable_detr'``: Co-DETR (Sense-X/Co-DETR ``co_deformable_detr_r50_1x_coco.py``):
  the above with box refinement, two-stage, mixed selection, look forward twice, FFN 2048 and
  no dropout, plus auxiliary heads (``aux_heads``) on the encoder output reshaped into maps and
  one more stride-2 conv + GroupNorm level (strides 8-128): ``'rpn_roi'``, an RPN (anchors of
  ``rpn_anchor_scale`` 4 strides, ``rpn_scales_per_octave`` 3 scales x ratios 0.5/1/2; top
  ``rpn_train_pre_nms`` 4000 per level, NMS ``rpn_nms_iou`` 0.7, ``rpn_train_post_nms`` 1000)
  and a RoI head (RoIAlign ``roi_output_size`` 7 from strides 8-64 with ``finest_scale`` 112
  and ``roi_sampling_ratio`` 2 samples per bin, two shared FC layers of ``fc_channels`` 1024,
  class-specific boxes); ``'atss'``, an ATSS head (one anchor of ``atss_anchor_scale`` 8
  strides per location, one stacked conv, GroupNorm, top-9 ATSS assignment). The positive
  boxes of each auxiliary head (at most ``aux_queries`` 300 per image, completed with random
  negatives) become a group of extra queries through the shared decoder.
  """
  if name not in DETECTORS:
    raise ConfigError(f"config key 'model.name' must be one of {DETECTORS}, got {name!r}")
  co = name == "co_deformable_detr"
  config = ml_collections.ConfigDict({
      "name": name,
      "backbone": "resnet50",
      "norm": "frozen_bn",
      "frozen_stages": 1,
      "pretrained": "",
      "image_size": 800,
      "num_classes": 80,
      "hidden_dim": 256,
      "num_levels": 4,
      "num_heads": 8,
      "num_points": 4,
      "encoder_layers": 6,
      "decoder_layers": 6,
      "ffn_dim": 2048 if co else 1024,
      "dropout": 0.0 if co else 0.1,
      "num_queries": 300,
      "box_refine": co,
      "two_stage": co,
      "mixed_selection": co,
      "look_forward_twice": co,
      "dtype": "float32",
  })
  if co:
    config.update({
        "aux_heads": AUX_HEADS,
        "aux_queries": 300,
        "rpn_anchor_scale": 4.0,
        "rpn_scales_per_octave": 3,
        "rpn_train_pre_nms": 4000,
        "rpn_train_post_nms": 1000,
        "rpn_nms_iou": 0.7,
        "roi_output_size": 7,
        "roi_sampling_ratio": 2,
        "finest_scale": 112.0,
        "fc_channels": 1024,
        "atss_anchor_scale": 8.0,
    })
  return config


MODEL_FIELDS = {name: tuple(default_model_config(name).keys()) for name in DETECTORS}


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class QueryStatic:
  """Hashable static description of a query-based detector (a pytree without leaves)."""
  name: str
  num_classes: int
  image_size: int
  hidden_dim: int
  num_levels: int
  num_heads: int
  num_points: int
  encoder_layers: int
  decoder_layers: int
  ffn_dim: int
  dropout: float
  num_queries: int
  box_refine: bool
  two_stage: bool
  mixed_selection: bool = False
  look_forward_twice: bool = False
  aux: AuxStatic | None = None

  @property
  def strides(self) -> tuple[int, ...]:
    return tuple(2 ** (BACKBONE_MIN_LEVEL + i) for i in range(self.num_levels))

  @property
  def spatial_shapes(self) -> tuple[tuple[int, int], ...]:
    """``(H_l, W_l)`` of every level (convolutions with torch padding: ``ceil(size / 2)``
    per stride-2 step)."""
    shapes = []
    size = self.image_size
    for _ in range(BACKBONE_MIN_LEVEL + self.num_levels):
      shapes.append(size)
      size = -(-size // 2)
    return tuple((s, s) for s in shapes[BACKBONE_MIN_LEVEL:])


RPN_RATIOS = (0.5, 1.0, 2.0)
#: Box coders of Co-DETR's auxiliary heads: RPN stds 1, RoI head and ATSS (0.1, 0.1, 0.2, 0.2).
RPN_STDS = (1.0, 1.0, 1.0, 1.0)
AUX_STDS = (0.1, 0.1, 0.2, 0.2)
#: The RoI head's assignment IoU (positive and negative) and the ATSS top-k.
ROI_IOU = 0.5
ATSS_TOPK = 9


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AuxStatic:
  """Static description of Co-DETR's auxiliary heads (``model.aux_*``, ``rpn_*``, ``roi_*``,
  ``atss_*`` fields), on ``num_levels`` maps of strides ``8 · 2^l``."""
  heads: tuple[str, ...]
  queries: int
  image_size: int
  num_levels: int
  rpn_anchor_scale: float
  rpn_scales_per_octave: int
  rpn_train_pre_nms: int
  rpn_train_post_nms: int
  rpn_nms_iou: float
  roi_output_size: int
  roi_sampling_ratio: int
  finest_scale: float
  fc_channels: int
  atss_anchor_scale: float

  @property
  def strides(self) -> tuple[int, ...]:
    return tuple(2 ** (BACKBONE_MIN_LEVEL + i) for i in range(self.num_levels))

  @property
  def roi_strides(self) -> tuple[int, ...]:
    """RoIAlign levels: all but the extra one (published strides 8-64)."""
    return self.strides[:-1]

  @property
  def rpn_anchors_per_location(self) -> int:
    return len(RPN_RATIOS) * self.rpn_scales_per_octave

  def rpn_anchors(self) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(float32 [A, 4] anchors, anchors per level)`` of the RPN."""
    return _aux_anchors(self.image_size, self.strides, RPN_RATIOS, self.rpn_anchor_scale,
                        self.rpn_scales_per_octave)

  def atss_anchors(self) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(float32 [A, 4] anchors, int32 [A] level, anchors per level)`` of the ATSS head."""
    anchors, levels = _aux_anchors(self.image_size, self.strides, (1.0,), self.atss_anchor_scale,
                                   1, with_levels=True)
    return anchors, levels, tuple(int(np.sum(levels == i)) for i in range(self.num_levels))


@functools.lru_cache(maxsize=16)
def _aux_anchors(image_size, strides, ratios, scale, scales_per_octave, with_levels=False):
  anchors, levels = ops.generate_anchors(image_size, strides=strides, ratios=ratios,
                                         octave_base_scale=scale,
                                         scales_per_octave=scales_per_octave)
  anchors.setflags(write=False)
  levels.setflags(write=False)
  if with_levels:
    return anchors, levels
  return anchors, tuple(int(np.sum(levels == i)) for i in range(len(strides)))


def check_model_config(config) -> QueryStatic:
  """Checks every field (:class:`ConfigError` naming ``'model.FIELD'``); returns the static
  info."""
  model = Section(config, "model")
  name = model.choice("name", DETECTORS)
  model.fields(MODEL_FIELDS[name])
  check_backbone_config(model)
  image_size = model.integer("image_size", min=64)
  num_classes = model.integer("num_classes", min=1)
  hidden = model.integer("hidden_dim", min=2)
  heads = model.integer("num_heads", min=1)
  if hidden % heads:
    raise model.error("num_heads", f"must divide model.hidden_dim ({hidden}), got {heads}")
  if hidden % 2:
    raise model.error("hidden_dim", f"must be even (sine position embedding), got {hidden}")
  levels = model.integer("num_levels", min=3, max=6)
  points = model.integer("num_points", min=1)
  enc = model.integer("encoder_layers", min=0)
  dec = model.integer("decoder_layers", min=1)
  ffn = model.integer("ffn_dim", min=1)
  dropout = model.number("dropout", min=0.0, below=1.0)
  queries = model.integer("num_queries", min=1)
  refine = model.boolean("box_refine")
  two_stage = model.boolean("two_stage")
  mixed = model.boolean("mixed_selection")
  if mixed and not two_stage:
    raise model.error("mixed_selection", "needs model.two_stage (positions from the encoder "
                                         "proposals)")
  look_twice = model.boolean("look_forward_twice")
  if look_twice and not refine:
    raise model.error("look_forward_twice", "needs model.box_refine")
  aux = check_aux_config(model, image_size, levels + 1) if name == "co_deformable_detr" else None
  if aux is not None and not (refine and two_stage):
    raise model.error("box_refine" if not refine else "two_stage",
                      "must be True for co_deformable_detr (its positive queries use the "
                      "per-layer heads, as published)")
  static = QueryStatic(name, num_classes, image_size, hidden, levels, heads, points, enc, dec,
                       ffn, dropout, queries, refine, two_stage, mixed, look_twice, aux)
  tokens = sum(h * w for h, w in static.spatial_shapes)
  if two_stage and queries > tokens:
    raise model.error("num_queries", f"must be at most the {tokens} encoder tokens of "
                                     f"{image_size} px with two_stage, got {queries}")
  return static


def check_aux_config(model: Section, image_size: int, num_levels: int) -> AuxStatic:
  """Checks Co-DETR's auxiliary-head fields of ``model``."""
  heads = model.config["aux_heads"]
  if (not isinstance(heads, (tuple, list)) or not heads or len(set(heads)) != len(heads)
      or any(h not in AUX_HEADS for h in heads)):
    raise model.error("aux_heads", f"must be a non-empty tuple of distinct names in "
                                   f"{AUX_HEADS}, got {heads!r}")
  heads = tuple(h for h in AUX_HEADS if h in heads)
  pre = model.integer("rpn_train_pre_nms", min=1)
  post = model.integer("rpn_train_post_nms", min=1)
  return AuxStatic(
      heads, model.integer("aux_queries", min=1), image_size, num_levels,
      model.number("rpn_anchor_scale", above=0.0), model.integer("rpn_scales_per_octave", min=1),
      pre, post, model.number("rpn_nms_iou", above=0.0, max=1.0),
      model.integer("roi_output_size", min=1), model.integer("roi_sampling_ratio", min=1),
      model.number("finest_scale", above=0.0), model.integer("fc_channels", min=1),
      model.number("atss_anchor_scale", above=0.0))


# ----------------------------------------------------------------------------------------
# Loss recipes.


class Recipe(NamedTuple):
  """Published settings of one query-based loss recipe (see
  :mod:`jaxrank.models.query_based.recipes`): the classification loss, its weight, the box
  losses' weights (``None``: value-balanced to the classification loss) and the Hungarian
  matching costs (focal class cost, L1, GIoU)."""
  loss: str
  delta: float | None
  cls_weight: float
  l1_weight: float | None
  giou_weight: float | None
  match_costs: tuple[float, float, float]
  aux_weight: float | None = None
  aux_rpn_weight: float | None = None


RECIPES = {
    # fundamentalvision/Deformable-DETR main.py: focal 2, L1 5, GIoU 2; same matching costs.
    # Co-DETR (co_deformable_detr_r50_1x_coco.py): auxiliary heads x 6 decoder layers x λ2 2.
    "focal": Recipe("focal", None, 2.0, 5.0, 2.0, (2.0, 5.0, 2.0), 12.0, 1.0),
    # BR repo projects/models/rank_based_co_deformable_detr_head.py with the exact RS loss.
    "rank_sort": Recipe("rank_sort", 0.5, 2.0, None, None, (4.0, 5.0, 2.0), 5.0, 0.2),
    # BR repo: BucketedRankSort loss_weight 2, L1 and GIoU value-balanced, class cost 4; the
    # auxiliary heads' BucketedRankSort loss_weight 5, the RPN's head_weight 0.2.
    "bucketed_rank_sort": Recipe("bucketed_rank_sort", 0.5, 2.0, None, None, (4.0, 5.0, 2.0),
                                 5.0, 0.2),
    # No published config: Parameterized AP Loss (classification and GIoU quality in one
    # loss) + the focal recipe's L1 x 5 and matching costs (see recipes.py).
    "pap": Recipe("pap", None, 1.0, 5.0, None, (2.0, 5.0, 2.0)),
}
LOSS_NAMES = tuple(RECIPES)
CO_DETR_LOSS_NAMES = tuple(name for name, r in RECIPES.items() if r.aux_weight is not None)


def default_loss_config(name: str = "bucketed_rank_sort") -> ml_collections.ConfigDict:
  """All loss fields; ``None`` means the published value of the recipe ``name``.

  Fields: ``name``; ``delta`` (smoothing of RS / bucketed RS, 0.5); ``cls_weight`` (focal 2,
  RS / bucketed RS rank weight 2, PAP 1); ``l1_weight`` / ``giou_weight`` (focal 5 / 2; RS and
  bucketed RS value-balance both to the ranking loss: ``None`` there); ``match_class`` /
  ``match_l1`` / ``match_giou`` (Hungarian costs: focal 2 / 5 / 2, RS and bucketed RS 4 / 5 /
  2); ``focal_alpha`` 0.25, ``focal_gamma`` 2 (focal loss and focal class cost);
  ``ranking_groups`` (1 = one ranking over the batch; G = G groups, as G devices);
  ``pap_preset`` (a name in :data:`jaxrank.losses.PRESETS`) or ``pap_theta`` (41 numbers in
  [0, 1], :func:`jaxrank.losses.params_from_theta`); ``pap_top_k`` (rows of the PAP loss).
  Co-DETR only (``None`` elsewhere): ``aux_weight`` (the auxiliary heads' multiplier: focal
  12, RS / bucketed RS 5), ``aux_rpn_weight`` (the RPN's on top: focal 1, RS / bucketed RS
  0.2), ``aux_query_weight`` (λ1 of the positive-query branch, 1).
  """
  if name not in RECIPES:
    raise ConfigError(f"config key 'loss.name' must be one of {LOSS_NAMES}, got {name!r}")
  return ml_collections.ConfigDict({
      "name": name,
      "delta": None,
      "cls_weight": None,
      "l1_weight": None,
      "giou_weight": None,
      "match_class": None,
      "match_l1": None,
      "match_giou": None,
      "focal_alpha": 0.25,
      "focal_gamma": 2.0,
      "ranking_groups": 1,
      "pap_preset": "retinanet",
      "pap_theta": None,
      "pap_top_k": 100_000,
      "aux_weight": None,
      "aux_rpn_weight": None,
      "aux_query_weight": None,
  })


LOSS_FIELDS = tuple(default_loss_config().keys())


class LossSettings(NamedTuple):
  """A checked loss config with the recipe's published values filled in (hashable)."""
  name: str
  loss: str
  delta: float | None
  cls_weight: float
  l1_weight: float | None
  giou_weight: float | None
  match_costs: tuple[float, float, float]
  focal_alpha: float
  focal_gamma: float
  groups: int
  pap_top_k: int
  aux_weight: float | None = None
  aux_rpn_weight: float | None = None
  aux_query_weight: float | None = None

  @property
  def has_aux_weights(self) -> bool:
    return (self.aux_weight, self.aux_rpn_weight, self.aux_query_weight) != (None,) * 3


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
    delta = loss.number("delta", min=0.0)

  def weight(field, published):
    value = loss.optional_number(field, min=0.0)
    return published if value is None else value

  cls_weight = weight("cls_weight", recipe.cls_weight)
  l1_weight, giou_weight = recipe.l1_weight, recipe.giou_weight
  for field, published in (("l1_weight", l1_weight), ("giou_weight", giou_weight)):
    if loss_config[field] is not None and published is None:
      raise loss.error(field, f"must be None for {name!r} (value-balanced to the "
                              "classification loss)")
  l1_weight = weight("l1_weight", l1_weight) if l1_weight is not None else None
  giou_weight = weight("giou_weight", giou_weight) if giou_weight is not None else None
  costs = tuple(weight(f, p) for f, p in zip(("match_class", "match_l1", "match_giou"),
                                             recipe.match_costs))
  alpha = loss.number("focal_alpha", min=0.0, max=1.0)
  gamma = loss.number("focal_gamma", min=0.0)
  groups = loss.integer("ranking_groups", min=1)
  top_k = loss.integer("pap_top_k", min=1)
  if name == "pap":
    pap_theta(loss_config)
  aux = tuple(loss.optional_number(f, min=0.0)
              for f in ("aux_weight", "aux_rpn_weight", "aux_query_weight"))
  return LossSettings(name, recipe.loss, delta, cls_weight, l1_weight, giou_weight, costs,
                      alpha, gamma, groups, top_k, *aux)


def check_no_aux_weights(static: QueryStatic, settings: LossSettings) -> None:
  """:class:`ConfigError` when ``loss.aux_*`` is set for a model without auxiliary heads."""
  if static.aux is None and settings.has_aux_weights:
    raise ConfigError("config keys 'loss.aux_weight', 'loss.aux_rpn_weight' and "
                      "'loss.aux_query_weight' must be None for a model without auxiliary "
                      f"heads ({static.name!r})")


def co_detr_loss_settings(settings: LossSettings, loss_config_name: str = "loss") -> LossSettings:
  """``settings`` with Co-DETR's published auxiliary weights filled in (:class:`ConfigError`
  for a loss without auxiliary heads: ``pap``)."""
  recipe = RECIPES[settings.name]
  if recipe.aux_weight is None:
    raise ConfigError(f"config key '{loss_config_name}.name' must be one of "
                      f"{CO_DETR_LOSS_NAMES} for co_deformable_detr, got {settings.name!r}")

  def published(value, default):
    return default if value is None else value

  return settings._replace(aux_weight=published(settings.aux_weight, recipe.aux_weight),
                           aux_rpn_weight=published(settings.aux_rpn_weight,
                                                    recipe.aux_rpn_weight),
                           aux_query_weight=published(settings.aux_query_weight, 1.0))


def pap_theta(loss_config) -> tuple[float, ...] | None:
  """The checked ``pap_theta`` (None when unset; then ``pap_preset`` is checked)."""
  loss = Section(loss_config, "loss")
  if loss_config.pap_theta is None:
    loss.choice("pap_preset", tuple(losses.PRESETS))
    return None
  return loss.numbers("pap_theta", length=parameterized.NUM_SEARCH_PARAMS, min=0.0, max=1.0)


class QueryLossState(NamedTuple):
  """Loss state of the query-based family: ``count``, the number of training batches so far
  (dropout keys are ``fold_in(key(0), count)``: deterministic, shard-independent, resumable),
  and ``pap``, the PAP functions (``None`` for the other recipes; constant in training)."""
  count: jax.Array
  pap: losses.PAPParams | None = None


def init_loss_state(loss_config) -> QueryLossState:
  """The initial :class:`QueryLossState`."""
  settings = check_loss_config(loss_config)
  pap = None
  if settings.loss == "pap":
    theta = pap_theta(loss_config)
    pap = (losses.PRESETS[loss_config.pap_preset] if theta is None
           else losses.params_from_theta(jnp.asarray(theta, jnp.float32)))
    pap = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), pap)
  return QueryLossState(jnp.zeros((), jnp.int32), pap)


def recipe_model_config(loss_name: str) -> ml_collections.ConfigDict:
  """The model config of the recipe ``detr_<loss_name>``: Deformable DETR with box refinement
  and the two-stage variant (the published best, 46.9 AP; the bucketed paper's query head is
  Co-DETR's, which also uses both)."""
  if loss_name not in RECIPES:
    raise ConfigError(f"config key 'loss.name' must be one of {LOSS_NAMES}, got {loss_name!r}")
  config = default_model_config()
  config.box_refine = True
  config.two_stage = True
  return config
