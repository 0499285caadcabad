"""Model and loss configs of the query-based family (Deformable DETR) and their checks.

``check_model_config`` returns the hashable :class:`QueryStatic` and ``check_loss_config`` the
hashable :class:`LossSettings`; the detector keeps both, so nothing re-reads a config while it
is traced.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxrank import losses
from jaxrank.losses import parameterized
from jaxrank.models.resnet import check_backbone_config
from jaxrank.validation import ConfigError, Section

DETECTORS = ("deformable_detr",)
#: Backbone levels C3-C5 (strides 8-32); further levels by stride-2 3x3 convolutions.
BACKBONE_MIN_LEVEL = 3


def default_model_config(name: str = "deformable_detr") -> ml_collections.ConfigDict:
  """All model fields, with the values of Deformable DETR's ``main.py`` (R50, 300 queries).

  ResNet-50 C3-C5 projected to ``hidden_dim`` 256 by 1x1 conv + GroupNorm (32), a fourth level
  by a stride-2 3x3 conv + GroupNorm of C5 (``num_levels`` 3-6); sine position embeddings
  (normalised, 2π) plus a learned embedding per level; 6 encoder and 6 decoder layers with 8
  heads, 4 sampling points per head and level, FFN 1024, dropout 0.1 (post-norm layers, ReLU);
  300 queries; a class and a box head (3-layer MLP) on every decoder layer. ``box_refine``:
  each decoder layer refines the reference boxes of the next (own heads per layer; published
  ``--with_box_refine``). ``two_stage``: the queries' reference boxes are the top
  ``num_queries`` encoder proposals (published ``--two_stage``, used with ``box_refine``).
  """
  if name not in DETECTORS:
    raise ConfigError(f"config key 'model.name' must be one of {DETECTORS}, got {name!r}")
  return ml_collections.ConfigDict({
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
      "ffn_dim": 1024,
      "dropout": 0.1,
      "num_queries": 300,
      "box_refine": False,
      "two_stage": False,
      "dtype": "float32",
  })


MODEL_FIELDS = tuple(default_model_config().keys())


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


def check_model_config(config) -> QueryStatic:
  """Checks every field (:class:`ConfigError` naming ``'model.FIELD'``); returns the static
  info."""
  model = Section(config, "model")
  model.fields(MODEL_FIELDS)
  name = model.choice("name", DETECTORS)
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
  static = QueryStatic(name, num_classes, image_size, hidden, levels, heads, points, enc, dec,
                       ffn, dropout, queries, refine, two_stage)
  tokens = sum(h * w for h, w in static.spatial_shapes)
  if two_stage and queries > tokens:
    raise model.error("num_queries", f"must be at most the {tokens} encoder tokens of "
                                     f"{image_size} px with two_stage, got {queries}")
  return static


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


RECIPES = {
    # fundamentalvision/Deformable-DETR main.py: focal 2, L1 5, GIoU 2; same matching costs.
    "focal": Recipe("focal", None, 2.0, 5.0, 2.0, (2.0, 5.0, 2.0)),
    # BR repo projects/models/rank_based_co_deformable_detr_head.py with the exact RS loss.
    "rank_sort": Recipe("rank_sort", 0.5, 2.0, None, None, (4.0, 5.0, 2.0)),
    # BR repo: BucketedRankSort loss_weight 2, L1 and GIoU value-balanced, class cost 4.
    "bucketed_rank_sort": Recipe("bucketed_rank_sort", 0.5, 2.0, None, None, (4.0, 5.0, 2.0)),
    # No published config: Parameterized AP Loss (classification and GIoU quality in one
    # loss) + the focal recipe's L1 x 5 and matching costs (see recipes.py).
    "pap": Recipe("pap", None, 1.0, 5.0, None, (2.0, 5.0, 2.0)),
}
LOSS_NAMES = tuple(RECIPES)


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
  return LossSettings(name, recipe.loss, delta, cls_weight, l1_weight, giou_weight, costs,
                      alpha, gamma, groups, top_k)


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
