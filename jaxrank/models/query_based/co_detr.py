"""Co-DETR (Zong et al., ICCV 2023: "DETRs with Collaborative Hybrid Assignments Training") on
Deformable DETR, and BRS-DETR (the bucketed ranking losses paper's Co-DETR with bucketed Rank &
Sort on every head).

The query head is Deformable DETR with box refinement, two-stage, mixed query selection and
look forward twice (:class:`~jaxrank.models.query_based.detector.DeformableDETR`). The encoder
output, reshaped into maps plus one stride-2 conv + GroupNorm level, feeds auxiliary heads
trained with one-to-many assignments: an RPN + RoI head (the two-stage family's heads and
losses) and an ATSS head. Their positive boxes become extra query groups ("customised positive
queries") that run through the shared decoder, supervised by the auxiliary head's labels and
boxes instead of a Hungarian matching. Only the query head predicts at test time.

Loss (``loss.name``; weights from Sense-X/Co-DETR ``co_deformable_detr_r50_1x_coco.py`` and the
BR repo's ``bucketed_co_deformable_detr_r50_1x_coco_iou_lr_2e-4_step_10_11_divide_5_fixed_seed_
1187060654_15072024.py``):

=======================  =================================  ==================================
head                     ``focal`` (Co-DETR)                ``rank_sort`` / ``bucketed_rank_
                                                            sort`` (RS-DETR / BRS-DETR)
=======================  =================================  ==================================
query head, every layer  focal 2, L1 5, GIoU 2              (B)RS x 2, L1 and GIoU value-
and encoder proposals                                       balanced; class cost 4
RPN                      12 x (BCE + L1), 256 sampled       5 x 0.2 x ((B)RS + value-balanced
                         anchors                            score-weighted GIoU), all anchors
RoI head                 12 x (softmax CE + 10 GIoU), 512   5 x ((B)RS + value-balanced GIoU),
                         sampled RoIs (proposals + gt)      all proposals, no gt appended
ATSS head                12 x (focal + 2 x centerness-      5 x ((B)RS + value-balanced
                         weighted GIoU + centerness BCE)    score-weighted GIoU), no centerness
positive queries, every  λ1 = 1 x (focal 2, L1 5, GIoU 2)   λ1 = 1 x the query head's loss
layer, per aux head      per positive query                 with the aux head's assignment
=======================  =================================  ==================================

Choices where the published code is dynamic or has a known bug:

* Positive queries: a static ``model.aux_queries`` per image and head (published: the batch's
  largest positive count, clipped to [9, 300]); positives first in a random order, then random
  negatives of the head (labels background, trained as negatives, as published).
* ``head_pos_embed``: published ``nn.Embedding(num_co_heads, 1, 1, embed_dims)`` is one scalar
  per head (and the second head's is frozen at 0 by ``padding_idx``, a bug the Co-DETR authors
  kept for their R50 numbers); here it is the intended ``[heads, hidden_dim]`` embedding.
* The aux boxes' position embedding uses the boxes clipped to [0, 1] (what the published
  ``sigmoid(inverse_sigmoid(box))`` computes); reference boxes are used unclipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax import lax

from jaxrank import losses, ops
from jaxrank.models.dense.heads import ATSSHead
from jaxrank.models.layers import normal_init
from jaxrank.models.pretrained import load_torchvision_resnet
from jaxrank.models.query_based import recipes
from jaxrank.models.query_based.config import (
  ATSS_TOPK,
  AUX_STDS,
  ROI_IOU,
  RPN_STDS,
  co_detr_loss_settings,
)
from jaxrank.models.query_based.detector import ConvGN, DeformableDETR
from jaxrank.models.query_based.transformer import LayerNorm, Linear, box_position_embedding
from jaxrank.models.two_stage import config as two_stage_config
from jaxrank.models.two_stage import recipes as two_stage_recipes
from jaxrank.models.two_stage.detector import (
  rcnn_batch_loss,
  roi_labels,
  rpn_batch_loss,
  stage_rois,
)
from jaxrank.models.two_stage.heads import BoxHead, RPNHead

#: Seed of the random choices of a step (samplers, positive-query subsets and padding), folded
#: with the loss state's step count.
SAMPLING_SEED = 1


def aux_head_settings(settings) -> two_stage_config.LossSettings:
  """The two-stage family's loss settings of Co-DETR's RPN and RoI head: ``ce_giou`` for the
  focal recipe (Co-DETR's RPN BCE + L1 and RoI CE + 10 GIoU with random samplers), else the
  ranking recipe on all anchors and all proposals (no gt appended), RPN weight
  ``settings.aux_rpn_weight``."""
  ranking = settings.loss != "focal"
  config = two_stage_config.default_loss_config(settings.loss if ranking else "ce_giou")
  config.rpn_weight = settings.aux_rpn_weight
  config.ranking_groups = settings.groups
  if ranking:
    config.delta = settings.delta
    config.rcnn_sampler = "all"
  return two_stage_config.check_loss_config(config)


def _groups(tree, groups: int):
  return jax.tree.map(lambda x: x.reshape((groups, x.shape[0] // groups) + x.shape[1:]), tree)


def centerness_targets(anchors, target_boxes):
  """``[..., A]`` ATSS centerness of each anchor centre in its target box:
  ``sqrt(min(l, r) / max(l, r) · min(t, b) / max(t, b))`` (0 where undefined)."""
  cx = (anchors[..., 0] + anchors[..., 2]) / 2
  cy = (anchors[..., 1] + anchors[..., 3]) / 2
  left, right = cx - target_boxes[..., 0], target_boxes[..., 2] - cx
  top, bottom = cy - target_boxes[..., 1], target_boxes[..., 3] - cy
  ratio_x = jnp.minimum(left, right) / jnp.maximum(jnp.maximum(left, right), 1e-12)
  ratio_y = jnp.minimum(top, bottom) / jnp.maximum(jnp.maximum(top, bottom), 1e-12)
  return jnp.sqrt(jnp.clip(ratio_x * ratio_y, 0.0, 1.0))


def atss_group_loss(settings, aux_settings, g, *, max_positives):
  """ATSS auxiliary head loss of one ranking group (``[b, A, ...]`` arrays), before
  ``aux_weight``."""
  positive, logits = g["positive"], g["logits"]
  where = jnp.broadcast_to(~g["ignored"][..., None], logits.shape)
  if settings.loss != "focal":
    total, metrics = two_stage_recipes.ranking_head_loss(
        aux_settings, logits, g["targets"], where, positive, g["pred_boxes"], g["target_boxes"],
        max_positives=max_positives)
    return total, metrics
  count = jnp.maximum(jnp.sum(positive), 1).astype(jnp.float32)
  cls_loss = jnp.sum(losses.sigmoid_focal_loss(logits, jnp.maximum(g["targets"], 0.0),
                                               alpha=settings.focal_alpha,
                                               gamma=settings.focal_gamma, where=where)) / count
  centerness = jnp.where(positive, centerness_targets(g["anchors"], g["target_boxes"]), 0.0)
  box_loss = losses.weighted_mean(losses.giou_loss(g["pred_boxes"], g["target_boxes"]),
                                  centerness, where=positive, eps=1e-6)
  bce = two_stage_recipes.optax_sigmoid_bce(g["centerness"], centerness)
  centerness_loss = jnp.sum(jnp.where(positive, bce, 0.0)) / count
  total = cls_loss + 2.0 * box_loss + centerness_loss
  return total, {"cls_loss": cls_loss, "box_loss": box_loss}


def select_queries(key, candidates: dict, count: int) -> dict:
  """``count`` candidates per image (``[B, N, ...]`` arrays with ``positive`` and ``valid``):
  the positives in a random order, then random valid negatives; slots beyond the valid
  candidates are marked invalid."""
  n = candidates["valid"].shape[1]
  if n < count:
    candidates = jax.tree.map(
        lambda x: jnp.pad(x, [(0, 0), (0, count - n)] + [(0, 0)] * (x.ndim - 2)), candidates)
  valid = candidates["valid"]
  noise = jax.random.uniform(key, valid.shape)
  priority = jnp.where(valid, 2.0 * candidates["positive"] + noise, -1.0)
  _, index = lax.top_k(priority, count)
  take = jax.vmap(lambda x, i: x[i])
  return jax.tree.map(lambda x: take(x, index), candidates)


class CoDeformableDETR(DeformableDETR):
  """Co-Deformable-DETR trained with one loss recipe (module docstring); ``detect`` is the
  query head's."""

  def __init__(self, config: ml_collections.ConfigDict,
               loss_config: ml_collections.ConfigDict | None = None, *, rngs: nnx.Rngs):
    super().__init__(config, loss_config, rngs=rngs)
    static = self._static
    aux = static.aux
    if aux is None:
      raise ValueError(f"model.name must be 'co_deformable_detr', got {static.name!r}")
    self._loss = co_detr_loss_settings(self._loss)
    settings = self._loss
    self._aux_settings = aux_head_settings(settings)
    c, dtype, k = static.hidden_dim, self.dtype, static.num_classes
    self.downsample = ConvGN(c, c, 3, stride=2, dtype=dtype, rngs=rngs)
    if "rpn_roi" in aux.heads:
      self.rpn = RPNHead(c, aux.rpn_anchors_per_location, channels=c, dtype=dtype, rngs=rngs)
      softmax = self._aux_settings.classifier == "softmax"
      self.roi_head = BoxHead(aux.roi_output_size ** 2 * c, k + softmax, k,
                              channels=aux.fc_channels, dtype=dtype, rngs=rngs)
    if "atss" in aux.heads:
      self.atss = ATSSHead(c, 1, k, num_convs=1, channels=c, num_levels=aux.num_levels,
                           centerness=settings.loss == "focal", dtype=dtype, rngs=rngs)
    heads = len(aux.heads)
    self.aux_pos_trans = nnx.List([Linear(2 * c, 2 * c, dtype=dtype, rngs=rngs)
                                   for _ in range(heads)])
    self.aux_pos_trans_norm = nnx.List([LayerNorm(2 * c, dtype=dtype) for _ in range(heads)])
    self.pos_feats_trans = nnx.List([Linear(c, c, dtype=dtype, rngs=rngs) for _ in range(heads)])
    self.pos_feats_norm = nnx.List([LayerNorm(c, dtype=dtype) for _ in range(heads)])
    self.head_pos_embed = nnx.Param(normal_init(1.0)(rngs.params(), (heads, c)))

  def encoder_maps(self, memory):
    """The encoder memory ``[B, S, C]`` as per-level maps ``[B, H, W, C]`` plus one stride-2
    conv + GroupNorm level (the auxiliary heads' inputs)."""
    static = self._static
    b, c = memory.shape[0], static.hidden_dim
    maps, start = [], 0
    for h, w in static.spatial_shapes:
      maps.append(memory[:, start:start + h * w].reshape(b, h, w, c))
      start += h * w
    maps.append(self.downsample(maps[-1]))
    return maps

  # ---------------------------------------------------------------------------------------
  # Auxiliary heads: (weighted loss, metrics, positive-query candidates).

  def _rpn_roi(self, maps, gt_boxes, gt_labels, gt_mask, valid, key):
    static, settings, aux_settings = self._static, self._loss, self._aux_settings
    aux, size = static.aux, static.image_size
    anchors, per_level = aux.rpn_anchors()
    anchors = jnp.asarray(anchors)
    logits, deltas = self.rpn(maps)
    rpn_loss, rpn_metrics = rpn_batch_loss(aux_settings, logits, deltas, anchors, gt_boxes,
                                           gt_mask, valid, jax.random.fold_in(key, 0),
                                           stds=RPN_STDS, allowed_border=-1, image_size=size)
    boxes = ops.decode_boxes(anchors, lax.stop_gradient(deltas), stds=RPN_STDS)
    propose = functools.partial(ops.rpn_proposals, num_anchors_per_level=per_level,
                                image_size=size, nms_pre=aux.rpn_train_pre_nms,
                                nms_post=aux.rpn_train_post_nms, iou_threshold=aux.rpn_nms_iou)
    props = jax.vmap(propose)(lax.stop_gradient(logits), boxes)
    props = props._replace(valid=props.valid & valid[:, None])
    rois, assignment = stage_rois(aux_settings, props, gt_boxes, gt_mask,
                                  jax.random.fold_in(key, 1), iou_threshold=ROI_IOU)
    align = functools.partial(ops.multilevel_roi_align, level_strides=aux.roi_strides,
                              output_size=(aux.roi_output_size,) * 2,
                              finest_scale=aux.finest_scale,
                              sampling_ratio=aux.roi_sampling_ratio)
    features = jax.vmap(align)(tuple(maps[:len(aux.roi_strides)]), rois.boxes)
    roi_logits, roi_deltas = self.roi_head(features)
    roi_loss, roi_metrics = rcnn_batch_loss(aux_settings, rois, assignment, roi_logits,
                                            roi_deltas, gt_boxes, gt_labels,
                                            num_classes=self.num_classes, stds=AUX_STDS)
    weight = settings.aux_weight
    metrics = {"rpn_loss": weight * rpn_loss, "rpn_cls_loss": rpn_metrics["cls_loss"],
               "roi_loss": weight * roi_loss, "roi_cls_loss": roi_metrics["cls_loss"],
               "roi_num_positives": roi_metrics["num_positives"]}
    candidates = {"boxes": rois.boxes, "positive": assignment.positive, "valid": rois.valid,
                  "labels": roi_labels(assignment, gt_labels),
                  "targets": jax.vmap(ops.box_targets)(assignment, gt_boxes),
                  "features": jnp.mean(features, axis=(2, 3))}
    return weight * (rpn_loss + roi_loss), metrics, candidates

  def _atss(self, maps, gt_boxes, gt_labels, gt_mask, valid):
    static, settings = self._static, self._loss
    aux, k = static.aux, static.num_classes
    anchors, levels, per_level = aux.atss_anchors()
    anchors = jnp.asarray(anchors)
    outputs = self.atss(maps)
    logits, deltas = outputs[0], outputs[1]
    assign = functools.partial(ops.atss_assign, anchors, jnp.asarray(levels), per_level,
                               topk=ATSS_TOPK)
    assignment = jax.vmap(assign)(gt_boxes, gt_mask)
    positive = assignment.positive & valid[:, None]
    ignored = (assignment.ignored | ~valid[:, None]) & ~positive
    assignment = assignment._replace(positive=positive, ignored=ignored)
    matched = jax.vmap(ops.box_targets)(assignment, gt_boxes)
    target_boxes = jnp.where(positive[..., None], matched, anchors)
    pred_boxes = ops.decode_boxes(anchors, deltas, stds=AUX_STDS)
    iou = None
    if settings.loss != "focal":
      iou = ops.aligned_iou(lax.stop_gradient(pred_boxes), target_boxes)
    targets = jax.vmap(lambda a, lab, t: ops.classification_targets(a, lab, k, iou_targets=t))(
        assignment, gt_labels, iou)
    g = {"logits": logits, "positive": positive, "ignored": ignored, "targets": targets,
         "pred_boxes": pred_boxes, "target_boxes": target_boxes,
         "anchors": jnp.broadcast_to(anchors, pred_boxes.shape)}
    if len(outputs) == 3:
      g["centerness"] = outputs[2]
    groups = settings.groups
    b = logits.shape[0]
    slots = min(anchors.shape[0], max(1, gt_boxes.shape[1]) * ATSS_TOPK * aux.num_levels)
    fn = functools.partial(atss_group_loss, settings, self._aux_settings,
                           max_positives=(b // groups) * slots)
    totals, group_metrics = jax.vmap(fn)(_groups(g, groups))
    weight = settings.aux_weight
    loss = weight * jnp.mean(totals)
    metrics = {"atss_loss": loss, "atss_cls_loss": jnp.mean(group_metrics["cls_loss"]),
               "atss_num_positives": jnp.sum(positive).astype(jnp.float32)}
    c = static.hidden_dim
    features = jnp.concatenate([m.reshape(b, -1, c) for m in maps], axis=1)
    candidates = {"boxes": jnp.broadcast_to(anchors, pred_boxes.shape), "positive": positive,
                  "valid": jnp.broadcast_to(valid[:, None], positive.shape),
                  "labels": roi_labels(assignment, gt_labels), "targets": matched,
                  "features": features}
    return loss, metrics, candidates

  # ---------------------------------------------------------------------------------------
  # Positive queries.

  def positive_queries(self, head: int, chosen: dict):
    """``(tgt, query_pos, reference)`` ``[B, P, ...]`` of auxiliary head ``head``'s chosen
    boxes: the box sine embedding through the head's Linear + LayerNorm gives the position
    and content halves; the content adds LN(Linear(feature)), the position the head's
    embedding."""
    static = self._static
    c, size = static.hidden_dim, static.image_size
    reference = ops.box_xyxy_to_cxcywh(chosen["boxes"] / size)
    embedding = box_position_embedding(jnp.clip(reference, 0.0, 1.0), c)
    pos_tgt = self.aux_pos_trans_norm[head](self.aux_pos_trans[head](embedding.astype(self.dtype)))
    query_pos, tgt = pos_tgt[..., :c], pos_tgt[..., c:]
    feats = chosen["features"].astype(self.dtype)
    tgt = tgt + self.pos_feats_norm[head](self.pos_feats_trans[head](feats))
    query_pos = query_pos + self.head_pos_embed[head].astype(query_pos.dtype)
    return tgt, query_pos, reference

  def _positive_query_loss(self, memory, chosen_per_head, key):
    static, settings = self._static, self._loss
    size = static.image_size
    parts = [self.positive_queries(h, chosen) for h, chosen in enumerate(chosen_per_head)]
    heads = len(parts)
    tgt, query_pos, reference = (jnp.concatenate(x, axis=0) for x in zip(*parts))
    memory = jnp.concatenate([memory] * heads, axis=0)
    logits, boxes = self.decode(tgt, query_pos, reference, memory, key)
    d, hb, p = logits.shape[:3]
    logits = logits.reshape((d, heads, hb // heads) + logits.shape[2:])
    boxes = boxes.reshape((d, heads, hb // heads) + boxes.shape[2:])
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *chosen_per_head)

    def head_loss(lg, bx, chosen):
      positive = chosen["positive"] & chosen["valid"]
      num = jnp.maximum(jnp.sum(positive), 1).astype(jnp.float32)
      return recipes.assigned_loss(settings, lg, bx, positive, chosen["targets"] / size,
                                   chosen["labels"], chosen["valid"], num,
                                   max_positives_per_image=p)

    per_layer = jax.vmap(jax.vmap(head_loss), in_axes=(0, 0, None))
    totals, metrics = per_layer(logits, boxes, stacked)
    return settings.aux_query_weight * jnp.sum(totals), metrics

  # ---------------------------------------------------------------------------------------
  # Training.

  def loss(self, batch: dict, loss_state):
    """``(loss, metrics, new_loss_state)``: the query head's set losses (every decoder layer
    and the encoder proposals), the auxiliary heads' losses and the positive queries' losses
    (module docstring).

    Metrics: those of :meth:`DeformableDETR.loss` plus ``rpn_loss``, ``roi_loss``,
    ``atss_loss`` (weighted), their ``*_cls_loss``, ``roi_num_positives``,
    ``atss_num_positives``, ``positive_query_loss`` (weighted, all layers and heads) and
    ``positive_query_num_positives`` (per layer, summed over heads)."""
    static = self._static
    inputs = self._loss_inputs(batch, loss_state)
    out = self(batch["image"], inputs.dropout_key)
    total, metrics = self._set_losses(out, inputs)
    key = jax.random.fold_in(jax.random.key(SAMPLING_SEED), loss_state.count)
    gt_boxes = inputs.gt_boxes * static.image_size
    maps = self.encoder_maps(out["memory"])
    candidates = []
    if "rpn_roi" in static.aux.heads:
      loss, head_metrics, chosen = self._rpn_roi(maps, gt_boxes, inputs.gt_labels,
                                                 inputs.gt_mask, inputs.valid,
                                                 jax.random.fold_in(key, 0))
      total = total + loss
      metrics.update(head_metrics)
      candidates.append(chosen)
    if "atss" in static.aux.heads:
      loss, head_metrics, chosen = self._atss(maps, gt_boxes, inputs.gt_labels, inputs.gt_mask,
                                              inputs.valid)
      total = total + loss
      metrics.update(head_metrics)
      candidates.append(chosen)
    count = static.aux.queries
    chosen = [select_queries(jax.random.fold_in(key, 2 + h), c, count)
              for h, c in enumerate(candidates)]
    decode_key = None if inputs.dropout_key is None else jax.random.fold_in(inputs.dropout_key, 7)
    query_loss, query_metrics = self._positive_query_loss(out["memory"], chosen, decode_key)
    total = total + query_loss
    metrics["positive_query_loss"] = query_loss
    metrics["positive_query_num_positives"] = jnp.sum(query_metrics["num_positives"][-1])
    metrics["loss"] = total
    return total, metrics, loss_state._replace(count=loss_state.count + 1)


def build_detector(model_config: ml_collections.ConfigDict,
                   loss_config: ml_collections.ConfigDict | None = None, *,
                   rngs: nnx.Rngs) -> CoDeformableDETR:
  """A :class:`CoDeformableDETR`; loads ``model_config.pretrained`` (torchvision ResNet) if
  set."""
  detector = CoDeformableDETR(model_config, loss_config, rngs=rngs)
  if model_config.pretrained:
    load_torchvision_resnet(detector, model_config.pretrained)
  return detector


