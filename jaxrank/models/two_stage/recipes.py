"""The losses of the RPN and of one R-CNN stage, as the published two-stage detectors use them.

=======================  ===============================  ====================================
``loss.name``            RPN (all anchors unless noted)   R-CNN (each stage)
=======================  ===============================  ====================================
``ce_smooth_l1``         BCE + L1, 256 sampled anchors    softmax CE + L1 of 512 sampled RoIs
                         per image                        (proposals + gt)
``ce_giou``              as ``ce_smooth_l1``              softmax CE + 10 x GIoU of decoded
                                                          boxes, 512 sampled RoIs
``rank_sort``            0.2 x (RS + value-balanced       RS over all RoIs x classes (proposals
                         score-weighted GIoU)             + gt) + value-balanced weighted GIoU
``bucketed_rank_sort``   as ``rank_sort`` with bucketed   as ``rank_sort`` with bucketed RS
                         RS
``alrp``                 0.2 x aLRP (GIoU errors / 0.6),  aLRP (GIoU errors), own self-balance
                         own self-balance weight          weight, all proposals
``pap``                  Parameterized AP (RPN preset),   Parameterized AP (R-CNN preset), all
                         256 sampled anchors per image    proposals, no gt appended
=======================  ===============================  ====================================

Every function works on one ranking group (``[b, ...]`` arrays; the detector ``vmap``s over
groups) and returns ``(loss, metrics)``; the losses are computed in float32.
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


def sampled_cross_entropy(logits, labels, sampled, *, softmax: bool):
  """Sum of the cross-entropy over ``sampled`` entries: softmax CE of ``logits [..., C+1]``
  against ``labels`` (``C`` = background), or binary CE of ``logits [...]`` against
  ``labels`` in {0, 1}."""
  if softmax:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    values = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  else:
    values = optax_sigmoid_bce(logits, labels.astype(jnp.float32))
  return jnp.sum(jnp.where(sampled, values, 0.0))


def optax_sigmoid_bce(logits, labels):
  """``-y log σ(x) - (1 - y) log(1 - σ(x))``, computed stably."""
  return jnp.maximum(logits, 0.0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def ranking_head_loss(settings, logits, targets, where, positive, pred_boxes, target_boxes, *,
                      max_positives, loss_state=None, error_scale: float = 1.0):
  """RS / bucketed RS / aLRP with its box term, as the rank-based RPN and R-CNN heads.

  RS, bucketed RS: ``L = L_RS + λ L_box``, ``L_box`` the GIoU loss of the positives weighted
  by their detached max sigmoid score, ``λ`` the value ratio ``L_RS / L_box`` (no gradient).
  aLRP: classification and localisation parts of :func:`jaxrank.losses.alrp_loss` on the
  positives' GIoU losses, ``L = L_cls + w L_loc`` with the head's self-balance weight ``w``
  (``loss_state``). ``targets`` are ``[b, N, C]`` (RS: IoU values at the positives).
  """
  loss_name = settings.recipe.loss
  giou = losses.giou_loss(pred_boxes, target_boxes)
  if loss_name == "alrp":
    errors = jnp.where(positive, giou * error_scale, 0.0)
    cls_loss, box_loss = losses.alrp_loss(logits, targets,
                                          jnp.broadcast_to(errors[..., None], logits.shape),
                                          delta=settings.delta, where=where,
                                          max_positives=max_positives)
    weight = lax.stop_gradient(loss_state.weight)
    # The RPN's errors are scaled (GIoU / 0.6) in both parts; the reported box loss too.
  else:
    cls_loss = RANKING[loss_name](logits, targets, delta=settings.delta, where=where,
                                  max_positives=max_positives)
    scores = lax.stop_gradient(jnp.max(jax.nn.sigmoid(logits), axis=-1))
    box_loss = losses.weighted_mean(giou, scores, where=positive, eps=1e-10)
    weight = losses.value_ratio_weight(cls_loss, box_loss)
  total = cls_loss + weight * box_loss
  return total, {"cls_loss": cls_loss, "box_loss": box_loss, "box_weight": weight}


def pap_head_loss(settings, params, logits, targets, where, positive, pred_boxes, target_boxes,
                  *, max_positives):
  """Parameterized AP Loss as the only loss of a head: quality ``(GIoU + 1) / 2`` of the
  positives' decoded boxes (gradient to the box branch, scaled there by ``grad_scale``)."""
  giou = losses.giou_loss(pred_boxes, target_boxes)
  quality = jnp.broadcast_to((1.0 - 0.5 * giou)[..., None], logits.shape)
  loss = losses.parameterized_ap_loss(logits, targets, quality, params, top_k=settings.pap_top_k,
                                      where=where, max_positives=max_positives)
  count = jnp.maximum(jnp.sum(positive), 1).astype(jnp.float32)
  box_loss = lax.stop_gradient(jnp.sum(jnp.where(positive, giou, 0.0)) / count)
  return loss, {"cls_loss": loss, "box_loss": box_loss}


def rpn_loss(settings, g, *, stds, max_positives, loss_state=None, pap_params=None):
  """The RPN loss of one group ``g`` (``[b, A]`` arrays: ``logits``, ``deltas``, ``anchors``,
  ``positive``, ``ignored``, ``sampled``, ``pred_boxes``, ``target_boxes``, ``iou``), before
  the recipe's RPN weight; ``stds`` the RPN coder's."""
  recipe = settings.recipe
  positive, logits = g["positive"], g["logits"]
  if recipe.loss == "ce":
    sampled = g["sampled"]
    count = jnp.maximum(jnp.sum(sampled), 1).astype(jnp.float32)
    cls_loss = sampled_cross_entropy(logits, positive.astype(jnp.int32), sampled, softmax=False)
    encoded = ops.encode_boxes(g["anchors"], g["target_boxes"], stds=stds)
    box = losses.l1_loss(g["deltas"], encoded, where=(positive & sampled)[..., None])
    cls_loss, box_loss = cls_loss / count, jnp.sum(box) / count
    return cls_loss + box_loss, {"cls_loss": cls_loss, "box_loss": box_loss}
  targets = jnp.where(positive, g["iou"] if recipe.loss in RANKING else 1.0, 0.0)[..., None]
  where = g["sampled"][..., None]
  if recipe.loss == "pap":
    return pap_head_loss(settings, pap_params, logits[..., None], targets, where, positive,
                         g["pred_boxes"], g["target_boxes"], max_positives=max_positives)
  return ranking_head_loss(settings, logits[..., None], targets, where, positive, g["pred_boxes"],
                           g["target_boxes"], max_positives=max_positives, loss_state=loss_state,
                           error_scale=recipe.rpn_error_scale)


def rcnn_loss(settings, g, *, num_classes, stds, max_positives, loss_state=None, pap_params=None):
  """The loss of one R-CNN stage for one group ``g`` (``[b, R]`` arrays: ``logits [b, R, L]``,
  ``deltas [b, R, 4]`` (of each RoI's gt class, or class-agnostic), ``rois``, ``positive``,
  ``valid`` (sampled or kept RoIs), ``labels``, ``pred_boxes``, ``target_boxes``, ``stds``)."""
  recipe = settings.recipe
  positive, valid, logits = g["positive"], g["valid"], g["logits"]
  if recipe.loss == "ce":
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    labels = jnp.where(positive, g["labels"], num_classes)
    cls_loss = sampled_cross_entropy(logits, labels, valid, softmax=True) / count
    if recipe.rcnn_box_loss == "giou":
      box = losses.giou_loss(g["pred_boxes"], g["target_boxes"], where=positive)
    else:
      encoded = ops.encode_boxes(g["rois"], g["target_boxes"], stds=stds)
      box = losses.l1_loss(g["deltas"], encoded, where=positive[..., None])
    box_loss = jnp.sum(box) / count
    total = cls_loss + recipe.rcnn_box_weight * box_loss
    return total, {"cls_loss": cls_loss, "box_loss": box_loss}
  onehot = g["labels"][..., None] == jnp.arange(num_classes)
  value = g["iou"] if recipe.loss in RANKING else jnp.ones(positive.shape, jnp.float32)
  targets = jnp.where(onehot & positive[..., None], value[..., None], 0.0)
  where = jnp.broadcast_to(valid[..., None], logits.shape)
  if recipe.loss == "pap":
    return pap_head_loss(settings, pap_params, logits, targets, where, positive, g["pred_boxes"],
                         g["target_boxes"], max_positives=max_positives)
  return ranking_head_loss(settings, logits, targets, where, positive, g["pred_boxes"],
                           g["target_boxes"], max_positives=max_positives, loss_state=loss_state)
