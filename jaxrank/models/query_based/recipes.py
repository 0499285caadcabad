"""Set losses of the query-based recipes: Hungarian matching, then one loss per decoder layer.

=========================  ===================================  ==============================
``loss.name``              classification                       boxes (matched queries)
=========================  ===================================  ==============================
``focal``                  2 x sigmoid focal (α 0.25, γ 2)      5 x L1 + 2 x GIoU
                           summed / number of gt boxes          (/ number of gt boxes)
``rank_sort``              2 x Rank & Sort over the flattened   L1 and GIoU, each value-
                           queries x classes of the ranking     balanced to the RS value
                           group; targets: IoU of the matched
                           prediction
``bucketed_rank_sort``     as ``rank_sort`` with bucketed RS    as ``rank_sort``
``pap``                    Parameterized AP Loss, quality       5 x L1 (/ number of gt boxes)
                           (GIoU + 1) / 2 of the matched
                           predictions
=========================  ===================================  ==============================

Matching (per image, :func:`jaxrank.ops.hungarian_match`): ``c_cls · focal cost + c_L1 ·
L1(cxcywh) - c_GIoU · GIoU``, with ``(c_cls, c_L1, c_GIoU)`` = (2, 5, 2) for ``focal`` and
``pap`` and (4, 5, 2) for the RS recipes (the bucketed paper's BRS-DETR query head).

``rank_sort`` / ``bucketed_rank_sort`` follow the BRS-DETR query head
(blisgard/BucketedRankingBasedLosses ``projects/models/rank_based_co_deformable_detr_head.py``):
targets of the matched (query, class) pairs are the IoU of the query's box with its ground
truth (a matched query with IoU 0 is a negative, as published), δ 0.5, rank and sort weight 2;
L1 (normalised cxcywh) and GIoU losses of the matched queries averaged over them, each
multiplied by ``stop_gradient(L_RS / value)``.

``pap`` has no published config (the Parameterized AP Loss paper reports Deformable DETR but
released no code for it). Chosen here: one :func:`jaxrank.losses.parameterized_ap_loss` over
the flattened queries x classes with quality ``(GIoU + 1) / 2`` of each matched query's box
(its gradient reaches the box head, scaled by the PAP functions' ``grad_scale``), as PAP
replaces both the classification and the IoU loss in RetinaNet; the L1 term of Deformable
DETR is kept (x 5, per gt box), as DETR's box head needs a signal on the normalised
coordinates early in training; matching with the focal recipe's costs.

Losses are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxrank import losses, ops

RANKING = {
    "rank_sort": losses.rank_sort_loss,
    "bucketed_rank_sort": losses.bucketed_rank_sort_loss,
}


def focal_class_cost(logits, labels, *, alpha: float, gamma: float):
  """``[..., Q, G]`` published focal classification cost of each query for each ground truth:
  ``α (1 - p)^γ (-log p) - (1 - α) p^γ (-log(1 - p))`` at the ground truth's class."""
  logits = jnp.asarray(logits, jnp.float32)
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  p = jnp.exp(log_p)
  pos = alpha * (1 - p) ** gamma * -log_p
  neg = (1 - alpha) * p ** gamma * -log_not_p
  cost = pos - neg                                       # [..., Q, K]
  return jnp.take_along_axis(cost, labels[..., None, :], axis=-1)


def matching_cost(settings, logits, boxes, gt_boxes, gt_labels):
  """``[B, Q, G]`` Hungarian cost: boxes are ``[B, Q, 4]`` cxcywh and ``gt_boxes [B, G, 4]``
  xyxy, both normalised to [0, 1]."""
  c_cls, c_l1, c_giou = settings.match_costs
  cls = focal_class_cost(logits, gt_labels, alpha=settings.focal_alpha,
                         gamma=settings.focal_gamma)
  gt_cxcywh = ops.box_xyxy_to_cxcywh(gt_boxes)
  l1 = jnp.sum(jnp.abs(boxes[:, :, None, :] - gt_cxcywh[:, None, :, :]), axis=-1)
  giou = jax.vmap(ops.pairwise_giou)(ops.box_cxcywh_to_xyxy(boxes), gt_boxes)
  return c_cls * cls + c_l1 * l1 - c_giou * giou


def _groups(x, groups: int):
  return x.reshape((groups, x.shape[0] // groups) + x.shape[1:])


def set_loss(settings, logits, boxes, gt_boxes, gt_labels, gt_mask, valid, *, pap_params=None):
  """``(loss, metrics)`` of one decoder layer's ``logits [B, Q, K]`` and ``boxes [B, Q, 4]``
  (cxcywh in [0, 1]) against ``gt_boxes [B, G, 4]`` (xyxy in [0, 1]), ``gt_labels``,
  ``gt_mask``; queries of images with ``valid`` False are ignored."""
  logits = jnp.asarray(logits, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  b, q, k = logits.shape
  g = gt_boxes.shape[1]
  cost = matching_cost(settings, lax.stop_gradient(logits), lax.stop_gradient(boxes), gt_boxes,
                       gt_labels)
  match = ops.hungarian_match(cost, gt_mask)
  gt_index = jnp.maximum(match.gt_index, 0)
  positive = (match.gt_index >= 0) & valid[:, None]
  take = jax.vmap(lambda x, i: x[i])
  target_xyxy = take(gt_boxes, gt_index) if g else jnp.zeros((b, q, 4), jnp.float32)
  target_labels = take(gt_labels, gt_index) if g else jnp.zeros((b, q), jnp.int32)
  num_boxes = jnp.maximum(jnp.sum(gt_mask), 1).astype(jnp.float32)
  return assigned_loss(settings, logits, boxes, positive, target_xyxy, target_labels,
                       jnp.broadcast_to(valid[:, None], (b, q)), num_boxes,
                       max_positives_per_image=max(1, min(g, q)), pap_params=pap_params)


def assigned_loss(settings, logits, boxes, positive, target_xyxy, target_labels, where,
                  num_boxes, *, max_positives_per_image: int, pap_params=None):
  """``(loss, metrics)`` of queries ``logits [B, Q, K]`` and ``boxes [B, Q, 4]`` (cxcywh in
  [0, 1]) with a given assignment: ``positive [B, Q]`` queries have the targets
  ``target_xyxy`` (xyxy in [0, 1]) and ``target_labels``; queries where ``where [B, Q]`` is
  False are ignored; focal and box sums are divided by ``num_boxes``. Used by the Hungarian
  set loss and by Co-DETR's positive queries (their auxiliary head's assignment)."""
  logits = jnp.asarray(logits, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  b, q, k = logits.shape
  positive = positive & where
  target_xyxy = jnp.where(positive[..., None], target_xyxy, 0.0)
  pred_xyxy = ops.box_cxcywh_to_xyxy(boxes)
  onehot = (target_labels[..., None] == jnp.arange(k)) & positive[..., None]
  where = jnp.broadcast_to(where[..., None], logits.shape)
  l1 = jnp.sum(losses.l1_loss(boxes, ops.box_xyxy_to_cxcywh(target_xyxy),
                              where=positive[..., None]), axis=-1)
  safe_target = jnp.where(positive[..., None], target_xyxy, pred_xyxy)
  giou = losses.giou_loss(pred_xyxy, lax.stop_gradient(safe_target), where=positive)
  num_positives = jnp.sum(positive).astype(jnp.float32)
  metrics = {"num_positives": num_positives}
  name = settings.loss
  groups = settings.groups
  max_positives = (b // groups) * max_positives_per_image
  if name == "focal":
    focal = losses.sigmoid_focal_loss(logits, onehot.astype(jnp.float32),
                                      alpha=settings.focal_alpha, gamma=settings.focal_gamma,
                                      where=where)
    cls_loss = jnp.sum(focal) / num_boxes
    l1_loss, giou_loss = jnp.sum(l1) / num_boxes, jnp.sum(giou) / num_boxes
    total = (settings.cls_weight * cls_loss + settings.l1_weight * l1_loss
             + settings.giou_weight * giou_loss)
  elif name in RANKING:
    iou = ops.aligned_iou(lax.stop_gradient(pred_xyxy), safe_target)
    targets = jnp.where(onehot, iou[..., None], 0.0)

    def group_loss(lg, tg, wg, l1g, gioug, posg):
      cls = settings.cls_weight * RANKING[name](lg, tg, delta=settings.delta, where=wg,
                                                max_positives=max_positives)
      count = jnp.maximum(jnp.sum(posg), 1).astype(jnp.float32)
      l1_value, giou_value = jnp.sum(l1g) / count, jnp.sum(gioug) / count
      total = (cls + losses.value_ratio_weight(cls, l1_value) * l1_value
               + losses.value_ratio_weight(cls, giou_value) * giou_value)
      return total, cls, l1_value, giou_value

    parts = jax.vmap(group_loss)(*(_groups(x, groups) for x in (logits, targets, where, l1, giou,
                                                                 positive)))
    total, cls_loss, l1_loss, giou_loss = (jnp.mean(x) for x in parts)
  elif name == "pap":
    if pap_params is None:
      raise ValueError("the 'pap' recipe needs pap_params")
    scaled = losses.grad_scale(pred_xyxy, pap_params.grad_scale)
    quality = 1.0 - 0.5 * losses.giou_loss(scaled, lax.stop_gradient(safe_target))
    quality = jnp.broadcast_to(quality[..., None], logits.shape)

    def group_loss(lg, tg, qg, wg):
      return losses.parameterized_ap_loss(lg, tg, qg, pap_params, top_k=settings.pap_top_k,
                                          where=wg, max_positives=max_positives)

    cls_loss = jnp.mean(jax.vmap(group_loss)(*(_groups(x, groups) for x in (
        logits, onehot.astype(jnp.float32), quality, where))))
    cls_loss = settings.cls_weight * cls_loss
    l1_loss = jnp.sum(l1) / num_boxes
    giou_loss = lax.stop_gradient(jnp.sum(giou) / num_boxes)
    total = cls_loss + settings.l1_weight * l1_loss
  else:
    raise ValueError(f"unknown query-based loss {name!r}")
  metrics.update(cls_loss=cls_loss, l1_loss=l1_loss, giou_loss=giou_loss)
  return total, metrics
