"""Two-stage detectors: backbone, FPN P2-P6, RPN, proposals, RoIAlign and one or more R-CNN
stages (Faster R-CNN: one; Cascade R-CNN: three)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax import lax

from jaxrank import losses, ops
from jaxrank.models.fpn import FPN
from jaxrank.models.layers import DTYPES
from jaxrank.models.pretrained import load_torchvision_resnet
from jaxrank.models.resnet import backbone_input, build_backbone
from jaxrank.models.two_stage import recipes
from jaxrank.models.two_stage.config import (
  MAX_LEVEL,
  MIN_LEVEL,
  ROI_STRIDES,
  AlrpState,
  LossSettings,
  PAPState,
  SamplerState,
  TwoStageStatic,
  check_loss_config,
  check_model_config,
  default_loss_config,
)
from jaxrank.models.two_stage.heads import BoxHead, RPNHead

SAMPLER_SEED = 0


class RoIs(NamedTuple):
  """The RoIs of a stage, ``[B, R]``: ``boxes [B, R, 4]``, ``valid`` (kept or sampled) and
  ``is_gt`` (a ground-truth box appended as a proposal)."""
  boxes: jax.Array
  valid: jax.Array
  is_gt: jax.Array


def _groups(tree, groups: int):
  return jax.tree.map(lambda x: x.reshape((groups, x.shape[0] // groups) + x.shape[1:]), tree)


def _mean_metrics(metrics):
  return {k: jnp.mean(v) for k, v in metrics.items()}


class TwoStageDetector(nnx.Module):
  """Faster R-CNN / Cascade R-CNN trained with one loss recipe (see
  :mod:`jaxrank.models.two_stage.recipes`). Deterministic: no dropout, frozen BatchNorm.

  Args:
    config: the model config (:func:`default_model_config`).
    loss_config: the loss config (:func:`default_loss_config`); it also fixes the classifier
      (softmax with background for the CE baselines, sigmoid for the ranking recipes).
  """

  def __init__(self, config: ml_collections.ConfigDict,
               loss_config: ml_collections.ConfigDict | None = None, *, rngs: nnx.Rngs):
    static = check_model_config(config)
    self._static = static
    self._loss = check_loss_config(default_loss_config() if loss_config is None
                                   else loss_config)
    self.name = config.name
    self.num_classes = static.num_classes
    self.image_size = static.image_size
    dtype = DTYPES[config.dtype]
    self.backbone = build_backbone(config.backbone, norm=config.norm,
                                   frozen_stages=config.frozen_stages, min_level=MIN_LEVEL,
                                   dtype=dtype, rngs=rngs)
    self.fpn = FPN(self.backbone.out_channels, config.fpn_channels, max_level=MAX_LEVEL,
                   extra_from="pool", min_level=MIN_LEVEL, dtype=dtype, rngs=rngs)
    self.rpn = RPNHead(config.fpn_channels, len(static.anchor_ratios),
                       channels=config.rpn_channels, dtype=dtype, rngs=rngs)
    num_logits = static.num_classes + (self._loss.classifier == "softmax")
    box_classes = 1 if static.class_agnostic else static.num_classes
    in_features = static.roi_output_size ** 2 * config.fpn_channels
    self.stages = nnx.List([
        BoxHead(in_features, num_logits, box_classes, channels=config.fc_channels, dtype=dtype,
                rngs=rngs) for _ in range(static.num_stages)])

  @property
  def anchors(self):
    """``float32 [A, 4]`` RPN anchors (read-only NumPy)."""
    return self._static.anchors

  def static_info(self) -> TwoStageStatic:
    return self._static

  @property
  def loss_settings(self) -> LossSettings:
    return self._loss

  # ---------------------------------------------------------------------------------------
  # Network pieces.

  def features(self, images):
    images = jnp.asarray(images)
    size = self.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"images must be [B, {size}, {size}, 3], got {images.shape}")
    return self.fpn(self.backbone(backbone_input(images, self.fpn.lateral[0].dtype)))

  def proposals(self, rpn_logits, rpn_deltas, *, training: bool) -> ops.Proposals:
    """Padded proposals ``[B, K]`` (no gradient)."""
    static = self._static
    pre, post = static.rpn_train if training else static.rpn_test
    boxes = static.decode_rpn(lax.stop_gradient(rpn_deltas))
    fn = functools.partial(ops.rpn_proposals, num_anchors_per_level=static.num_anchors_per_level,
                           image_size=static.image_size, nms_pre=pre, nms_post=post,
                           iou_threshold=static.rpn_nms_iou)
    return jax.vmap(fn)(lax.stop_gradient(rpn_logits), boxes)

  def roi_features(self, features, boxes):
    """``[B, R, S, S, C]`` RoIAlign features of ``boxes [B, R, 4]`` from P2-P5."""
    static = self._static
    fn = functools.partial(ops.multilevel_roi_align, level_strides=ROI_STRIDES,
                           output_size=(static.roi_output_size,) * 2,
                           finest_scale=static.finest_scale,
                           sampling_ratio=static.roi_sampling_ratio)
    return jax.vmap(fn)(tuple(features[:len(ROI_STRIDES)]), boxes)

  def run_stage(self, stage: int, features, boxes):
    """``(logits [B, R, L], deltas [B, R, K, 4])`` of stage ``stage`` on ``boxes``."""
    return self.stages[stage](self.roi_features(features, boxes))

  def decode_stage(self, stage: int, rois, deltas):
    """Boxes ``[..., 4]`` of ``deltas [..., 4]`` around ``rois`` with the stage's coder."""
    return ops.decode_boxes(rois, deltas, stds=self._static.stage_box_stds[stage])

  def _refine(self, stage: int, rois, logits, deltas):
    """The next stage's proposals: the stage's boxes (of its predicted class when
    class-specific), clipped, without gradient."""
    if deltas.shape[-2] > 1:
      cls_logits = logits[..., :self.num_classes]
      label = jnp.argmax(cls_logits, axis=-1)
      deltas = jnp.take_along_axis(deltas, label[..., None, None], axis=-2)
    boxes = self.decode_stage(stage, rois, deltas[..., 0, :])
    size = self.image_size
    return lax.stop_gradient(ops.clip_boxes(boxes, (size, size)))

  # ---------------------------------------------------------------------------------------
  # Training.

  def loss(self, batch: dict, loss_state):
    """``(loss, metrics, new_loss_state)`` of a batch with the detector's recipe.

    Metrics: ``loss``; ``rpn_loss`` (weighted), ``rpn_cls_loss``, ``rpn_box_loss``;
    ``rcnn_loss`` (sum of the weighted stages), ``s{k}_cls_loss``, ``s{k}_box_loss``;
    ``num_positives`` (positive RoIs of the first stage, whole batch),
    ``rpn_num_positives`` and ``num_proposals`` (mean kept proposals per image).
    """
    settings, static = self._loss, self._static
    recipe = settings.recipe
    images = batch["image"]
    batch_size = images.shape[0]
    groups = settings.groups
    if batch_size % groups:
      raise ValueError(f"loss.ranking_groups={groups} must divide the batch size {batch_size}")
    pap = alrp = None
    if recipe.loss == "pap":
      if not isinstance(loss_state, PAPState):
        raise ValueError("PAP needs loss_state = init_loss_state(...) (a PAPState)")
      pap = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (loss_state.rpn, loss_state.rcnn))
    if recipe.loss == "alrp":
      if not isinstance(loss_state, AlrpState):
        raise ValueError("aLRP needs loss_state = init_loss_state(...) (an AlrpState)")
      if settings.alrp_period < 1:
        raise ValueError("loss.alrp_period must be >= 1 (0 means one epoch: the trainer sets "
                         "it to the steps per epoch)")
      alrp = loss_state
    key = None
    if settings.random:
      if not isinstance(loss_state, (SamplerState, PAPState)):
        raise ValueError("a random sampler needs loss_state = init_loss_state(...) "
                         "(a SamplerState or PAPState)")
      key = jax.random.fold_in(jax.random.key(SAMPLER_SEED), loss_state.count)

    gt_boxes = jnp.asarray(batch["boxes"], jnp.float32)
    gt_labels = jnp.asarray(batch["labels"], jnp.int32)
    valid = jnp.asarray(batch.get("valid", jnp.ones((batch_size,), bool)), bool)
    gt_mask = jnp.asarray(batch["box_mask"], bool) & valid[:, None]

    features = self.features(images)
    rpn_logits, rpn_deltas = self.rpn(features)
    if pap is not None:
      rpn_deltas = losses.grad_scale(rpn_deltas, pap[0].grad_scale)
    rpn_total, rpn_metrics = self._rpn_loss(rpn_logits, rpn_deltas, gt_boxes, gt_mask, valid,
                                            key, alrp, pap)
    metrics = {"rpn_loss": rpn_total, "rpn_cls_loss": rpn_metrics["cls_loss"],
               "rpn_box_loss": rpn_metrics["box_loss"],
               "rpn_num_positives": rpn_metrics["num_positives"]}

    props = self.proposals(rpn_logits, rpn_deltas, training=True)
    metrics["num_proposals"] = jnp.mean(jnp.sum(props.valid, axis=1).astype(jnp.float32))
    props = props._replace(valid=props.valid & valid[:, None])
    rcnn_total = jnp.zeros((), jnp.float32)
    stage_state = alrp.rcnn if alrp is not None else None
    rcnn_cls = []
    rcnn_box = []
    for stage in range(static.num_stages):
      stage_key = None if key is None else jax.random.fold_in(key, 1 + stage)
      rois, assignment = self._stage_rois(stage, props, gt_boxes, gt_mask, stage_key)
      logits, deltas = self.run_stage(stage, features, rois.boxes)
      stage_loss, stage_metrics = self._rcnn_loss(stage, rois, assignment, logits, deltas,
                                                  gt_boxes, gt_labels, stage_state, pap)
      rcnn_total = rcnn_total + static.stage_loss_weights[stage] * stage_loss
      metrics[f"s{stage}_cls_loss"] = stage_metrics["cls_loss"]
      metrics[f"s{stage}_box_loss"] = stage_metrics["box_loss"]
      rcnn_cls.append(stage_metrics["cls_loss"])
      rcnn_box.append(stage_metrics["box_loss"])
      if stage == 0:
        metrics["num_positives"] = stage_metrics["num_positives"]
      if stage + 1 < static.num_stages:
        boxes = self._refine(stage, rois.boxes, logits, deltas)
        props = ops.Proposals(boxes, jnp.zeros(boxes.shape[:2], jnp.float32),
                              rois.valid & ~rois.is_gt)
    metrics["rcnn_loss"] = rcnn_total
    loss = rpn_total + rcnn_total
    metrics["loss"] = loss

    new_state = loss_state
    if alrp is not None:
      period = settings.alrp_period
      new_state = AlrpState(
          losses.alrp_self_balance_update(alrp.rpn, rpn_metrics["cls_loss"],
                                          rpn_metrics["box_loss"], period=period),
          losses.alrp_self_balance_update(alrp.rcnn, jnp.mean(jnp.stack(rcnn_cls)),
                                          jnp.mean(jnp.stack(rcnn_box)), period=period))
      metrics["rpn_alrp_weight"] = alrp.rpn.weight
      metrics["rcnn_alrp_weight"] = alrp.rcnn.weight
    elif isinstance(loss_state, (SamplerState, PAPState)) and settings.random:
      new_state = loss_state._replace(count=loss_state.count + 1)
    return loss, metrics, new_state

  def _rpn_loss(self, logits, deltas, gt_boxes, gt_mask, valid, key, alrp, pap):
    static = self._static
    return rpn_batch_loss(self._loss, logits, deltas, jnp.asarray(static.anchors), gt_boxes,
                          gt_mask, valid, key, stds=static.rpn_box_stds,
                          allowed_border=static.rpn_allowed_border, image_size=static.image_size,
                          alrp_state=None if alrp is None else alrp.rpn,
                          pap_params=None if pap is None else pap[0])

  def _stage_rois(self, stage, props, gt_boxes, gt_mask, key):
    return stage_rois(self._loss, props, gt_boxes, gt_mask, key,
                      iou_threshold=self._static.stage_iou_thresholds[stage])

  def _rcnn_loss(self, stage, rois, assignment, logits, deltas, gt_boxes, gt_labels, alrp_state,
                 pap):
    return rcnn_batch_loss(self._loss, rois, assignment, logits, deltas, gt_boxes, gt_labels,
                           num_classes=self.num_classes,
                           stds=self._static.stage_box_stds[stage], alrp_state=alrp_state,
                           pap_params=None if pap is None else pap[1])

  # ---------------------------------------------------------------------------------------
  # Inference.

  def detect(self, images, *, score_threshold: float = 0.05, max_detections: int = 100,
             iou_threshold: float = 0.5, pre_nms_top_k: int = 1000) -> ops.Detections:
    """Post-processed detections ``[B, D]`` (boxes clipped to the input image).

    Test-time proposals, then every stage in turn on the previous stage's boxes; scores are
    the classifier of the stages' mean logits (as mmdet's Cascade R-CNN) and boxes the last
    stage's; :func:`jaxrank.ops.multiclass_nms` keeps the best ``pre_nms_top_k`` (box, class)
    pairs and then ``max_detections`` after class-wise NMS.
    """
    static = self._static
    features = self.features(images)
    rpn_logits, rpn_deltas = self.rpn(features)
    props = self.proposals(rpn_logits, rpn_deltas, training=False)
    rois = props.boxes
    logit_sum = 0.0
    for stage in range(static.num_stages):
      logits, deltas = self.run_stage(stage, features, rois)
      logit_sum = logit_sum + logits
      if stage + 1 < static.num_stages:
        rois = self._refine(stage, rois, logits, deltas)
    mean_logits = logit_sum / static.num_stages
    if self._loss.classifier == "softmax":
      scores = jax.nn.softmax(mean_logits, axis=-1)[..., :self.num_classes]
    else:
      scores = jax.nn.sigmoid(mean_logits)
    size = self.image_size
    last = static.num_stages - 1
    boxes = ops.clip_boxes(self.decode_stage(last, rois[..., None, :], deltas), (size, size))
    if boxes.shape[-2] == 1:
      boxes = boxes[..., 0, :]
    post = functools.partial(ops.multiclass_nms, score_threshold=score_threshold,
                             pre_nms_top_k=pre_nms_top_k, iou_threshold=iou_threshold,
                             max_detections=max_detections)
    return jax.vmap(lambda s, b, m: post(s, b, mask=m))(scores, boxes, props.valid)


def build_detector(model_config: ml_collections.ConfigDict,
                   loss_config: ml_collections.ConfigDict | None = None, *,
                   rngs: nnx.Rngs) -> TwoStageDetector:
  """A :class:`TwoStageDetector`; loads ``model_config.pretrained`` (torchvision ResNet) if
  set."""
  detector = TwoStageDetector(model_config, loss_config, rngs=rngs)
  if model_config.pretrained:
    load_torchvision_resnet(detector, model_config.pretrained)
  return detector


def rpn_batch_loss(settings: LossSettings, logits, deltas, anchors, gt_boxes, gt_mask, valid, key,
                   *, stds, allowed_border: float, image_size: int, alrp_state=None,
                   pap_params=None):
  """``(weighted loss, metrics)`` of an RPN's ``logits [B, A]`` and ``deltas [B, A, 4]`` on
  ``anchors [A, 4]``: max-IoU assignment (0.7 / 0.3, low-quality matches), anchors farther
  than ``allowed_border`` outside the image ignored (``< 0``: none), the recipe's sampler
  (``key`` for the random one), :func:`jaxrank.models.two_stage.recipes.rpn_loss` per ranking
  group, times ``settings.rpn_weight``. Metrics: ``cls_loss``, ``box_loss`` (group means),
  ``num_positives`` (whole batch)."""
  assign = functools.partial(ops.max_iou_assign, anchors, pos_iou=0.7, neg_iou=0.3,
                             min_pos_iou=0.3, match_low_quality=True)
  assignment = jax.vmap(assign)(gt_boxes, gt_mask)
  inside = jnp.ones(anchors.shape[:1], bool)
  if allowed_border >= 0:
    inside = jnp.all((anchors[:, :2] >= -allowed_border)
                     & (anchors[:, 2:] <= image_size + allowed_border), axis=1)
  positive = assignment.positive & valid[:, None] & inside
  ignored = (assignment.ignored | ~valid[:, None] | ~inside) & ~positive
  target_boxes = jnp.where(positive[..., None],
                           jax.vmap(ops.box_targets)(assignment._replace(positive=positive),
                                                     gt_boxes), anchors)
  pred_boxes = ops.decode_boxes(anchors, deltas, stds=stds)
  g = {"logits": logits, "deltas": deltas, "positive": positive, "ignored": ignored,
       "pred_boxes": pred_boxes, "target_boxes": target_boxes,
       "anchors": jnp.broadcast_to(anchors, deltas.shape)}
  if settings.rpn_sampler == "random":
    num, fraction = settings.rpn_samples
    keys = jax.random.split(jax.random.fold_in(key, 0), logits.shape[0])
    sample = functools.partial(ops.random_sample, num=num, pos_fraction=fraction)
    index, kept, _ = jax.vmap(sample)(keys, positive, ~positive & ~ignored)
    rows = jnp.arange(logits.shape[0])[:, None]
    g["sampled"] = jnp.zeros(positive.shape, bool).at[rows, index].max(kept)
  else:
    g["sampled"] = ~ignored
  g["iou"] = ops.aligned_iou(lax.stop_gradient(pred_boxes), target_boxes)
  slots = min(settings.max_positives_per_image, anchors.shape[0])
  if settings.rpn_sampler == "random":
    num, fraction = settings.rpn_samples
    slots = max(1, min(slots, int(num * fraction)))
  groups = settings.groups
  fn = functools.partial(recipes.rpn_loss, settings, stds=stds,
                         max_positives=(logits.shape[0] // groups) * slots,
                         loss_state=alrp_state, pap_params=pap_params)
  totals, metrics = jax.vmap(fn)(_groups(g, groups))
  metrics = _mean_metrics(metrics)
  metrics["num_positives"] = jnp.sum(positive).astype(jnp.float32)
  return settings.rpn_weight * jnp.mean(totals), metrics


def stage_rois(settings: LossSettings, props: ops.Proposals, gt_boxes, gt_mask, key, *,
               iou_threshold: float):
  """The RoIs ``[B, R]`` of an R-CNN stage and their :class:`~jaxrank.ops.Assignment`:
  ``props`` with the ground truth appended (``rcnn_sampler`` 'all_with_gt' and 'random'),
  max-IoU assignment at ``iou_threshold``, then the random sampler's RoIs (``key``) or all."""
  if settings.rcnn_sampler == "all":
    candidates = props
    is_gt = jnp.zeros(props.valid.shape, bool)
  else:
    candidates = jax.vmap(ops.append_gt_boxes)(props, gt_boxes, gt_mask)
    k = props.valid.shape[1]
    is_gt = jnp.broadcast_to(jnp.arange(candidates.valid.shape[1]) >= k,
                             candidates.valid.shape)
  assign = functools.partial(ops.max_iou_assign, pos_iou=iou_threshold, neg_iou=iou_threshold,
                             min_pos_iou=iou_threshold, match_low_quality=False)
  assignment = jax.vmap(assign)(candidates.boxes, gt_boxes, gt_mask)
  positive = assignment.positive & candidates.valid
  assignment = assignment._replace(positive=positive, ignored=~candidates.valid)
  rois = RoIs(candidates.boxes, candidates.valid, is_gt)
  if settings.rcnn_sampler != "random":
    return rois, assignment
  num, fraction = settings.rcnn_samples
  keys = jax.random.split(key, positive.shape[0])
  sample = functools.partial(ops.random_sample, num=num, pos_fraction=fraction)
  index, kept, _ = jax.vmap(sample)(keys, positive, ~positive & candidates.valid)
  # Samples come first, padding last: with fewer candidates than ``num`` the slots past
  # their count are padding.
  slots = min(num, positive.shape[1])
  index, kept = index[:, :slots], kept[:, :slots]
  take = jax.vmap(lambda x, i: x[i])
  rois = RoIs(take(rois.boxes, index), kept, take(rois.is_gt, index) & kept)
  assignment = jax.tree.map(lambda x: take(x, index), assignment)
  assignment = assignment._replace(positive=assignment.positive & kept, ignored=~kept)
  return rois, assignment


def roi_labels(assignment, gt_labels):
  """``int32 [B, R]`` class of each RoI's matched ground truth (0 where there is none)."""
  return jax.vmap(lambda lab, m: lab[m] if lab.shape[0] else jnp.zeros_like(m))(
      gt_labels, assignment.matched_gt)


def rcnn_batch_loss(settings: LossSettings, rois: RoIs, assignment, logits, deltas, gt_boxes,
                    gt_labels, *, num_classes: int, stds, alrp_state=None, pap_params=None):
  """``(loss, metrics)`` of an R-CNN stage's ``logits [B, R, L]`` and ``deltas [B, R, K, 4]``
  on ``rois``: :func:`jaxrank.models.two_stage.recipes.rcnn_loss` per ranking group (deltas
  of each RoI's gt class when class-specific; ``pap_params`` scale their gradient)."""
  positive = assignment.positive
  labels = roi_labels(assignment, gt_labels)
  if deltas.shape[-2] > 1:
    deltas = jnp.take_along_axis(deltas, labels[..., None, None], axis=-2)
  deltas = deltas[..., 0, :]
  if pap_params is not None:
    deltas = losses.grad_scale(deltas, pap_params.grad_scale)
  target_boxes = jnp.where(positive[..., None],
                           jax.vmap(ops.box_targets)(assignment, gt_boxes), rois.boxes)
  pred_boxes = ops.decode_boxes(rois.boxes, deltas, stds=stds)
  g = {"logits": logits, "deltas": deltas, "rois": rois.boxes, "positive": positive,
       "valid": rois.valid, "labels": labels, "pred_boxes": pred_boxes,
       "target_boxes": target_boxes,
       "iou": ops.aligned_iou(lax.stop_gradient(pred_boxes), target_boxes)}
  groups = settings.groups
  per_group = logits.shape[0] // groups
  fn = functools.partial(recipes.rcnn_loss, settings, num_classes=num_classes, stds=stds,
                         max_positives=per_group * logits.shape[1], loss_state=alrp_state,
                         pap_params=pap_params)
  totals, metrics = jax.vmap(fn)(_groups(g, groups))
  metrics = _mean_metrics(metrics)
  metrics["num_positives"] = jnp.sum(positive).astype(jnp.float32)
  return jnp.mean(totals), metrics
