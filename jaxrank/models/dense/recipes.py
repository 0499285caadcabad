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

import jax
import jax.numpy as jnp
from jax import lax

from jaxrank import losses, ops
from jaxrank.models.dense.config import ATSS_TOPK, DetectorStatic, LossSettings, check_loss_config

_RANKING = {
    "ap": losses.ap_loss,
    "rank_sort": losses.rank_sort_loss,
    "bucketed_rank_sort": losses.bucketed_rank_sort_loss,
    "bucketed_ap": losses.bucketed_ap_loss,
}


def _assign(assigner, static: DetectorStatic, anchors, gt_boxes, gt_mask):
  if assigner == "max_iou":
    fn = functools.partial(ops.max_iou_assign, anchors)
  else:
    fn = functools.partial(ops.atss_assign, anchors, jnp.asarray(static.level_index),
                           static.num_anchors_per_level, topk=ATSS_TOPK)
  return jax.vmap(fn)(gt_boxes, gt_mask)


def _positive_slots(resolved: LossSettings, static: DetectorStatic, num_anchors, max_boxes):
  per_image = min(resolved.max_positives_per_image, num_anchors)
  if resolved.assigner == "atss":
    per_image = min(per_image, max(1, max_boxes) * ATSS_TOPK * len(static.num_anchors_per_level))
  return per_image


def _group_loss(g, *, resolved: LossSettings, static: DetectorStatic, anchors, slots, alrp_weight,
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


def detection_loss(detector_static: DetectorStatic, outputs, batch: dict,
                   loss_config: LossSettings, loss_state):
  """The training loss of one batch: ``(loss, (metrics, new_loss_state))``.

  Pure and jit-able (``detector_static`` from ``DenseDetector.static_info()``;
  ``loss_config`` the :class:`LossSettings` of ``check_loss_config``, or a loss ConfigDict,
  then checked on every call). Padding examples (``batch['valid']`` False) and padded boxes
  contribute nothing; images without boxes give negatives only. Metrics: ``loss``,
  ``cls_loss`` (the classification or ranking loss), ``box_loss`` (before weighting),
  ``box_weight``, ``num_positives`` (anchors, whole batch), ``ranking_loss`` and
  ``sorting_loss`` (RS, bucketed RS) and ``alrp_weight`` (aLRP). Values are means over
  ranking groups, except ``num_positives``, a sum. PAP: ``loss = cls_loss`` is the PAP
  loss, ``box_loss`` the mean GIoU loss of the positives (reported, not optimised).
  """
  resolved = (loss_config if isinstance(loss_config, LossSettings)
              else check_loss_config(loss_config))
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
    raise ValueError(f"loss.ranking_groups={groups} must divide the batch size {batch_size}")
  if resolved.self_balanced:
    if not isinstance(loss_state, losses.SelfBalanceState):
      raise ValueError("aLRP needs loss_state = init_loss_state(loss_config)")
    if resolved.alrp_period < 1:
      raise ValueError("loss.alrp_period must be >= 1 (0 means one epoch: the trainer "
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
