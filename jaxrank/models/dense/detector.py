"""Dense one-stage detectors: backbone, FPN P3-P7 and a dense head (RetinaNet or ATSS-style)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxrank import ops
from jaxrank.models.dense import recipes
from jaxrank.models.dense.config import (
  DetectorStatic,
  LossSettings,
  check_loss_config,
  check_model_config,
  default_loss_config,
)
from jaxrank.models.dense.heads import ATSSHead, RetinaHead
from jaxrank.models.fpn import FPN
from jaxrank.models.layers import DTYPES
from jaxrank.models.pretrained import load_torchvision_resnet
from jaxrank.models.resnet import backbone_input, build_backbone


class DetectorOutputs(NamedTuple):
  """Dense predictions: ``class_logits [B, A, C]`` and ``box_deltas [B, A, 4]``, float32."""
  class_logits: jax.Array
  box_deltas: jax.Array


class DenseDetector(nnx.Module):
  """Backbone + FPN + dense head, trained with one loss recipe. Deterministic: no dropout,
  frozen BatchNorm.

  Args:
    config: the model config (:func:`default_model_config`).
    loss_config: the loss config (:func:`default_loss_config`); default: the model's
      default recipe ('focal_smooth_l1'), for inference-only use.
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
    self.num_anchors_per_level = static.num_anchors_per_level
    dtype = DTYPES[config.dtype]
    self.dtype = dtype
    self.backbone = build_backbone(config.backbone, norm=config.norm,
                                   frozen_stages=config.frozen_stages, dtype=dtype, rngs=rngs)
    self.fpn = FPN(self.backbone.out_channels, config.fpn_channels, max_level=config.max_level,
                   extra_from="input" if config.name == "retinanet" else "output", dtype=dtype,
                   rngs=rngs)
    head = RetinaHead if config.name == "retinanet" else ATSSHead
    self.head = head(config.fpn_channels, len(static.anchor_ratios) * static.scales_per_octave,
                     static.num_classes, num_convs=config.head_convs,
                     channels=config.head_channels, prior_prob=config.prior_prob,
                     num_levels=len(static.strides), dtype=dtype, rngs=rngs)

  @property
  def anchors(self) -> np.ndarray:
    """``float32 [A, 4]`` anchors for ``image_size`` (read-only NumPy)."""
    return self._static.anchors

  def static_info(self) -> DetectorStatic:
    """What :func:`jaxrank.models.dense.recipes.detection_loss` needs (hashable)."""
    return self._static

  @property
  def loss_settings(self) -> LossSettings:
    """The checked loss config this detector trains with."""
    return self._loss

  def __call__(self, images) -> DetectorOutputs:
    images = jnp.asarray(images)
    size = self.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"images must be [B, {size}, {size}, 3], got {images.shape}")
    features = self.fpn(self.backbone(backbone_input(images, self.dtype)))
    logits, deltas = self.head(features)
    return DetectorOutputs(logits, deltas)

  def loss(self, batch: dict, loss_state):
    """``(loss, metrics, new_loss_state)`` of a batch with the detector's loss recipe (see
    :func:`jaxrank.models.dense.recipes.detection_loss`)."""
    outputs = self(batch["image"])
    loss, (metrics, new_state) = recipes.detection_loss(self._static, outputs, batch,
                                                        self._loss, loss_state)
    return loss, metrics, new_state

  def decode(self, box_deltas):
    """xyxy boxes ``[B, A, 4]`` in input-image pixels (not clipped)."""
    return self._static.decode(box_deltas)

  def detect(self, images, *, score_threshold: float = 0.05, max_detections: int = 100,
             iou_threshold: float = 0.5, pre_nms_top_k: int = 1000) -> ops.Detections:
    """Post-processed detections ``[B, D]`` (boxes clipped to the input image)."""
    outputs = self(images)
    size = self.image_size
    boxes = ops.clip_boxes(self.decode(outputs.box_deltas), (size, size))
    post = functools.partial(ops.postprocess_detections,
                             num_anchors_per_level=self.num_anchors_per_level,
                             score_threshold=score_threshold, pre_nms_top_k=pre_nms_top_k,
                             iou_threshold=iou_threshold, max_detections=max_detections)
    return jax.vmap(post)(outputs.class_logits, boxes)


def build_detector(model_config: ml_collections.ConfigDict,
                   loss_config: ml_collections.ConfigDict | None = None, *,
                   rngs: nnx.Rngs) -> DenseDetector:
  """A :class:`DenseDetector`; loads ``model_config.pretrained`` (torchvision ResNet) if set."""
  detector = DenseDetector(model_config, loss_config, rngs=rngs)
  if model_config.pretrained:
    load_torchvision_resnet(detector, model_config.pretrained)
  return detector
