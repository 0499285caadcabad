"""Detection losses as the published detectors use them.

=====================  =========  ========  =====  =====================================
``name``               detector   assigner  delta  box loss (weight)
=====================  =========  ========  =====  =====================================
``focal_smooth_l1``    RetinaNet  max-IoU   -      smooth L1 (beta 0.11) / #pos (1)
``focal_giou``         RetinaNet  max-IoU   -      GIoU / #pos (2)
``ap_smooth_l1``       RetinaNet  max-IoU   1.0    smooth L1 (beta 1) mean over coords (1)
``alrp``               RetinaNet  max-IoU   1.0    aLRP localisation on 1 - GIoU (self-balance)
``rank_sort``          ATSS       ATSS      0.5    score-weighted GIoU mean (value ratio)
``bucketed_rank_sort`` ATSS       ATSS      0.5    score-weighted GIoU mean (value ratio)
``bucketed_ap``        ATSS       ATSS      1.0    score-weighted GIoU mean (2)
``pap``                RetinaNet  max-IoU   -      inside PAP (quality (GIoU + 1) / 2)
=====================  =========  ========  =====  =====================================

``pap`` is Parameterized AP Loss as the only loss (spec 6.6): its functions come from
``loss.pap_preset`` or ``loss.pap_theta`` (the 41 searched numbers) and live in the loss
state (a :class:`jaxrank.losses.PAPParams` pytree), so a search can ``vmap`` a training step
over them; the box deltas pass through :func:`jaxrank.losses.grad_scale` with the searched
gradient scale before decoding.

Classification targets use the one-ranking layout of :func:`jaxrank.ops.classification_targets`
(``[B, A, C]``, ignored anchors' rows excluded); RS and bucketed RS write the IoU of each
positive's detached decoded prediction with its gt into its one-hot slot. Everything runs per
ranking group (``ranking_groups``, the per-device batch of the published code) with ``vmap``
and is averaged over groups.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from jaxrank import losses, ops
from jaxrank.losses import parameterized
from jaxrank.models.detector import DetectorOutputs, DetectorStatic, default_model_config

ATSS_TOPK = 9


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
ASSIGNERS = ("max_iou", "atss")
_RANKING = {
    "ap": losses.ap_loss,
    "rank_sort": losses.rank_sort_loss,
    "bucketed_rank_sort": losses.bucketed_rank_sort_loss,
    "bucketed_ap": losses.bucketed_ap_loss,
}


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
    raise ValueError(f"loss_config.name must be one of {LOSS_NAMES}, got {name!r}")
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


_FIELDS = tuple(default_loss_config().keys())


def recipe_model_config(name: str) -> ml_collections.ConfigDict:
  """The model config of the detector that recipe ``name`` was published with.

  RS-ATSS: 3 anchors per location; AP Loss RetinaNet: 6 (ratios 0.5/1/2, 2 scales); aLRP
  RetinaNet: 2 (ratio 1, 2 scales); PAP RetinaNet: 6; focal RetinaNet: 9.
  """
  if name not in RECIPES:
    raise ValueError(f"loss_config.name must be one of {LOSS_NAMES}, got {name!r}")
  config = default_model_config(RECIPES[name].detector)
  if name in ("ap_smooth_l1", "pap"):
    config.scales_per_octave = 2
  elif name == "alrp":
    config.anchor_ratios = (1.0,)
    config.scales_per_octave = 2
  return config


class Resolved(NamedTuple):
  name: str
  recipe: Recipe
  assigner: str
  delta: float | None
  max_positives_per_image: int
  alrp_period: int
  fixed_weight: float | None
  groups: int
  pap_top_k: int


def check_loss_config(loss_config) -> Resolved:
  """Validates ``loss_config`` (``ValueError`` naming the field) and fills in the defaults."""
  unknown = sorted(set(loss_config.keys()) - set(_FIELDS))
  if unknown:
    raise ValueError(f"unknown loss_config field(s) {unknown}; expected {_FIELDS}")
  missing = [f for f in _FIELDS if f not in loss_config]
  if missing:
    raise ValueError(f"loss_config is missing field(s) {missing}")
  name = loss_config.name
  if name not in RECIPES:
    raise ValueError(f"loss_config.name must be one of {LOSS_NAMES}, got {name!r}")
  recipe = RECIPES[name]
  assigner = recipe.assigner if loss_config.assigner is None else loss_config.assigner
  if assigner not in ASSIGNERS:
    raise ValueError(f"loss_config.assigner must be one of {ASSIGNERS} or None, got {assigner!r}")
  delta = recipe.delta
  if loss_config.delta is not None:
    if recipe.delta is None:
      raise ValueError(f"loss_config.delta must be None for {name!r} (it has no delta)")
    delta = _number(loss_config.delta, "delta")
    positive_only = recipe.cls_loss in ("ap", "alrp")
    if delta < 0 or (delta == 0 and positive_only):
      raise ValueError(f"loss_config.delta must be {'> 0' if positive_only else '>= 0'}, "
                       f"got {delta}")
  max_pos = _count(loss_config.max_positives_per_image, "max_positives_per_image", 1)
  period = _count(loss_config.alrp_period, "alrp_period", 0)
  _number(loss_config.alrp_initial_weight, "alrp_initial_weight")
  fixed = None
  if loss_config.box_loss_weight is not None:
    fixed = _number(loss_config.box_loss_weight, "box_loss_weight")
    if fixed < 0:
      raise ValueError(f"loss_config.box_loss_weight must be >= 0, got {fixed}")
  elif recipe.balance == "fixed":
    fixed = recipe.box_weight
  groups = _count(loss_config.ranking_groups, "ranking_groups", 1)
  top_k = _count(loss_config.pap_top_k, "pap_top_k", 1)
  if recipe.cls_loss == "pap":
    if loss_config.box_loss_weight is not None:
      raise ValueError("loss_config.box_loss_weight must be None for 'pap' (PAP is the only "
                       "loss; the box branch's gradient scale is part of the PAP parameters)")
    _pap_theta(loss_config)
  return Resolved(name, recipe, assigner, delta, max_pos, period, fixed, groups, top_k)


def _pap_theta(loss_config) -> list[float] | None:
  """The validated ``pap_theta`` (None when unset, then ``pap_preset`` is checked)."""
  theta = loss_config.pap_theta
  if theta is None:
    if loss_config.pap_preset not in losses.PRESETS:
      raise ValueError(f"loss_config.pap_preset must be one of {tuple(losses.PRESETS)}, got "
                       f"{loss_config.pap_preset!r}")
    return None
  try:
    values = [float(v) for v in theta]
  except (TypeError, ValueError):
    raise ValueError(f"loss_config.pap_theta must be {parameterized.NUM_SEARCH_PARAMS} numbers in "
                     f"[0, 1], got {theta!r}") from None
  if len(values) != parameterized.NUM_SEARCH_PARAMS or not all(0.0 <= v <= 1.0 for v in values):
    raise ValueError(f"loss_config.pap_theta must be {parameterized.NUM_SEARCH_PARAMS} numbers in "
                     f"[0, 1], got {len(values)} values {values}")
  return values


def pap_params(loss_config) -> losses.PAPParams:
  """The PAP functions of ``loss_config`` (``pap_theta`` if set, else ``pap_preset``) as
  float32 arrays."""
  theta = _pap_theta(loss_config)
  params = (losses.PRESETS[loss_config.pap_preset] if theta is None
            else losses.params_from_theta(jnp.asarray(theta, jnp.float32)))
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def _number(value, field):
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"loss_config.{field} must be a number, got {value!r}")
  return float(value)


def _count(value, field, low):
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"loss_config.{field} must be an int >= {low}, got {value!r}")
  return int(value)


def init_loss_state(loss_config):
  """aLRP's :class:`jaxrank.losses.SelfBalanceState`, PAP's :class:`jaxrank.losses.PAPParams`
  (constant during training); an empty dict for the other recipes."""
  resolved = check_loss_config(loss_config)
  if resolved.recipe.cls_loss == "pap":
    return pap_params(loss_config)
  if resolved.recipe.balance == "self_balance" and resolved.fixed_weight is None:
    return losses.alrp_self_balance_init(float(loss_config.alrp_initial_weight))
  return {}


def _assign(assigner, static: DetectorStatic, anchors, gt_boxes, gt_mask):
  if assigner == "max_iou":
    fn = functools.partial(ops.max_iou_assign, anchors)
  else:
    fn = functools.partial(ops.atss_assign, anchors, jnp.asarray(static.level_index),
                           static.num_anchors_per_level, topk=ATSS_TOPK)
  return jax.vmap(fn)(gt_boxes, gt_mask)


def _positive_slots(resolved: Resolved, static: DetectorStatic, num_anchors, max_boxes):
  per_image = min(resolved.max_positives_per_image, num_anchors)
  if resolved.assigner == "atss":
    per_image = min(per_image, max(1, max_boxes) * ATSS_TOPK * len(static.num_anchors_per_level))
  return per_image


def _group_loss(g, *, resolved: Resolved, static: DetectorStatic, anchors, slots, alrp_weight,
                pap_params):
  """Loss of one ranking group; ``g`` holds ``[b, A, ...]`` arrays."""
  recipe = resolved.recipe
  logits, deltas = g["logits"], g["deltas"]
  positive, targets = g["positive"], g["targets"]
  where = jnp.broadcast_to(~g["ignored"][..., None], logits.shape)
  num_pos = jnp.sum(positive)
  denom = jnp.maximum(num_pos, 1).astype(jnp.float32)
  max_positives = logits.shape[0] * slots
  metrics = {"num_positives": num_pos.astype(jnp.float32)}

  box_loss = None
  if recipe.cls_loss == "pap":
    giou = losses.giou_loss(g["pred_boxes"], g["target_boxes"])
    quality = jnp.broadcast_to((1.0 - 0.5 * giou)[..., None], logits.shape)
    loss = losses.parameterized_ap_loss(logits, targets, quality, pap_params,
                                        top_k=resolved.pap_top_k, where=where,
                                        max_positives=max_positives)
    box_loss = lax.stop_gradient(jnp.sum(jnp.where(positive, giou, 0.0)) / denom)
    metrics.update(loss=loss, cls_loss=loss, box_loss=box_loss,
                   box_weight=jnp.zeros((), jnp.float32))
    return loss, metrics
  if recipe.cls_loss == "focal":
    cls_loss = jnp.sum(losses.sigmoid_focal_loss(logits, jnp.maximum(targets, 0.0), where=where))
    cls_loss = cls_loss / denom
  elif recipe.cls_loss == "alrp":
    errors = jnp.where(positive, losses.giou_loss(g["pred_boxes"], g["target_boxes"]), 0.0)
    cls_loss, box_loss = losses.alrp_loss(
        logits, targets, jnp.broadcast_to(errors[..., None], logits.shape), delta=resolved.delta,
        where=where, max_positives=max_positives)
  else:
    cls_loss = _RANKING[recipe.cls_loss](logits, targets, delta=resolved.delta, where=where,
                                         max_positives=max_positives)
    if recipe.cls_loss in ("rank_sort", "bucketed_rank_sort"):
      parts = losses.ranking_errors(logits, targets, loss=recipe.cls_loss, delta=resolved.delta,
                                    where=where, max_positives=max_positives)
      count = jnp.maximum(jnp.sum(parts.positive), 1).astype(jnp.float32)
      metrics["ranking_loss"] = jnp.sum(parts.ranking) / count
      metrics["sorting_loss"] = jnp.sum(parts.sorting) / count

  if recipe.box_loss == "smooth_l1":
    encoded = ops.encode_boxes(anchors, g["target_boxes"], stds=static.box_stds)
    values = losses.smooth_l1_loss(deltas, encoded, beta=recipe.beta, where=positive[..., None])
    box_loss = jnp.sum(values) / (4.0 * denom if recipe.box_mean_over_coords else denom)
  elif recipe.box_loss == "giou":
    box_loss = jnp.sum(losses.giou_loss(g["pred_boxes"], g["target_boxes"], where=positive)) / denom
  elif recipe.box_loss == "weighted_giou":
    scores = lax.stop_gradient(jnp.max(jax.nn.sigmoid(logits), axis=-1))
    box_loss = losses.weighted_mean(losses.giou_loss(g["pred_boxes"], g["target_boxes"]), scores,
                                    where=positive)

  if resolved.fixed_weight is not None:
    weight = jnp.asarray(resolved.fixed_weight, jnp.float32)
  elif recipe.balance == "value_ratio":
    weight = losses.value_ratio_weight(cls_loss, box_loss)
  else:
    weight = lax.stop_gradient(alrp_weight)
  total = cls_loss + weight * box_loss
  metrics.update(loss=total, cls_loss=cls_loss, box_loss=box_loss, box_weight=weight)
  return total, metrics


def detection_loss(detector_static: DetectorStatic, outputs: DetectorOutputs, batch: dict,
                   loss_config, loss_state):
  """The training loss of one batch: ``(loss, (metrics, new_loss_state))``.

  Pure and jit-able (``detector_static`` from ``Detector.static_info()``, ``loss_config`` a
  ConfigDict closed over). Padding examples (``batch['valid']`` False) and padded boxes
  contribute nothing; images without boxes give negatives only. Metrics: ``loss``,
  ``cls_loss`` (the classification or ranking loss), ``box_loss`` (before weighting),
  ``box_weight``, ``num_positives`` (anchors, whole batch), ``ranking_loss`` and
  ``sorting_loss`` (RS, bucketed RS) and ``alrp_weight`` (aLRP). Values are means over
  ranking groups, except ``num_positives``, a sum. PAP: ``loss = cls_loss`` is the PAP
  loss, ``box_loss`` the mean GIoU loss of the positives (reported, not optimised).
  """
  resolved = check_loss_config(loss_config)
  static = detector_static
  logits = jnp.asarray(outputs.class_logits, jnp.float32)
  deltas = jnp.asarray(outputs.box_deltas, jnp.float32)
  anchors = jnp.asarray(static.anchors)
  if logits.ndim != 3 or logits.shape[1:] != (anchors.shape[0], static.num_classes):
    raise ValueError(f"class_logits must be [B, {anchors.shape[0]}, {static.num_classes}], "
                     f"got {logits.shape}")
  if deltas.shape != logits.shape[:2] + (4,):
    raise ValueError(f"box_deltas must be {logits.shape[:2] + (4,)}, got {deltas.shape}")
  batch_size, num_anchors, num_classes = logits.shape
  groups = resolved.groups
  if batch_size % groups:
    raise ValueError(f"loss_config.ranking_groups={groups} must divide the batch size {batch_size}")
  if resolved.recipe.balance == "self_balance" and resolved.fixed_weight is None:
    if not isinstance(loss_state, losses.SelfBalanceState):
      raise ValueError("aLRP needs loss_state = init_loss_state(loss_config)")
    if resolved.alrp_period < 1:
      raise ValueError("loss_config.alrp_period must be >= 1 (0 means one epoch: the trainer "
                       "sets it to the steps per epoch)")
  pap = None
  if resolved.recipe.cls_loss == "pap":
    if not isinstance(loss_state, losses.PAPParams):
      raise ValueError("PAP needs loss_state = init_loss_state(loss_config) (a PAPParams)")
    pap = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), loss_state)
    deltas = losses.grad_scale(deltas, pap.grad_scale)

  gt_boxes = jnp.asarray(batch["boxes"], jnp.float32)
  gt_labels = jnp.asarray(batch["labels"], jnp.int32)
  valid = jnp.asarray(batch.get("valid", jnp.ones((batch_size,), bool)), bool)
  gt_mask = jnp.asarray(batch["box_mask"], bool) & valid[:, None]
  assignment = _assign(resolved.assigner, static, anchors, gt_boxes, gt_mask)
  positive = assignment.positive & valid[:, None]
  ignored = (assignment.ignored | ~valid[:, None]) & ~positive
  assignment = assignment._replace(positive=positive, ignored=ignored)

  matched = jax.vmap(ops.box_targets)(assignment, gt_boxes)
  target_boxes = jnp.where(positive[..., None], matched, anchors)
  pred_boxes = static.decode(deltas)
  if resolved.recipe.cls_loss in ("rank_sort", "bucketed_rank_sort"):
    ious = ops.aligned_iou(lax.stop_gradient(pred_boxes), target_boxes)
    targets = jax.vmap(lambda a, l, t: ops.classification_targets(a, l, num_classes,
                                                                  iou_targets=t))(
        assignment, gt_labels, ious)
  else:
    targets = jax.vmap(lambda a, l: ops.classification_targets(a, l, num_classes))(
        assignment, gt_labels)

  per_image = {"logits": logits, "deltas": deltas, "positive": positive, "ignored": ignored,
               "targets": targets, "pred_boxes": pred_boxes, "target_boxes": target_boxes}
  grouped = jax.tree.map(lambda x: x.reshape((groups, batch_size // groups) + x.shape[1:]),
                         per_image)
  alrp_weight = (loss_state.weight if isinstance(loss_state, losses.SelfBalanceState)
                 else jnp.zeros((), jnp.float32))
  slots = _positive_slots(resolved, static, num_anchors, gt_boxes.shape[1])
  fn = functools.partial(_group_loss, resolved=resolved, static=static, anchors=anchors,
                         slots=slots, alrp_weight=alrp_weight, pap_params=pap)
  totals, group_metrics = jax.vmap(fn)(grouped)
  metrics = {k: (jnp.sum(v) if k == "num_positives" else jnp.mean(v))
             for k, v in group_metrics.items()}
  loss = jnp.mean(totals)
  new_state = loss_state
  if isinstance(loss_state, losses.SelfBalanceState):
    metrics["alrp_weight"] = loss_state.weight
    if resolved.fixed_weight is None:
      new_state = losses.alrp_self_balance_update(loss_state, metrics["cls_loss"],
                                                  metrics["box_loss"], period=resolved.alrp_period)
  return loss, (metrics, new_state)
