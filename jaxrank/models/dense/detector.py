"""One-stage detectors: backbone, FPN P3-P7 and a dense head (RetinaNet or ATSS-style)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxrank import ops
from jaxrank.models.fpn import FPN
from jaxrank.models.heads import ATSSHead, RetinaHead
from jaxrank.models.layers import DTYPES, NORMS
from jaxrank.models.resnet import BACKBONES, RESNET_SPECS, build_backbone

DETECTORS = ("retinanet", "atss")


def default_model_config(name: str = "retinanet") -> ml_collections.ConfigDict:
  """All model fields, with the published anchors of ``name``.

  ``'retinanet'``: 9 anchors per location (ratios 0.5/1/2, octave base 4, 3 scales), FPN
  extra levels from C5. ``'atss'``: RS-ATSS's 3 anchors per location (ratio 1, octave base
  4, 3 scales), extra levels from P5, GroupNorm head with per-level scales.
  """
  if name not in DETECTORS:
    raise ValueError(f"name must be one of {DETECTORS}, got {name!r}")
  return ml_collections.ConfigDict({
      "name": name,
      "backbone": "resnet50",
      "norm": "frozen_bn",
      "frozen_stages": 1,
      "pretrained": "",
      "image_size": 512,
      "num_classes": 80,
      "fpn_channels": 256,
      "min_level": 3,
      "max_level": 7,
      "head_convs": 4,
      "head_channels": 256,
      "prior_prob": 0.01,
      "anchor_ratios": (0.5, 1.0, 2.0) if name == "retinanet" else (1.0,),
      "octave_base_scale": 4.0,
      "scales_per_octave": 3,
      "box_stds": (0.1, 0.1, 0.2, 0.2),
      "dtype": "float32",
  })


_FIELDS = tuple(default_model_config().keys())


def _int(config, field, low, high=None):
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"model_config.{field} must be an int, got {value!r}")
  if value < low or (high is not None and value > high):
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"model_config.{field} must be {bounds}, got {value}")
  return int(value)


def _float(config, field, low, high=None):
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise ValueError(f"model_config.{field} must be a number, got {value!r}")
  value = float(value)
  if not value > low or (high is not None and not value < high):
    bounds = f"> {low}" if high is None else f"in ({low}, {high})"
    raise ValueError(f"model_config.{field} must be {bounds}, got {value}")
  return value


def _choice(config, field, choices):
  value = config[field]
  if value not in choices:
    raise ValueError(f"model_config.{field} must be one of {choices}, got {value!r}")
  return value


def _floats(config, field, length=None):
  try:
    values = tuple(float(v) for v in config[field])
  except TypeError as e:
    raise ValueError(f"model_config.{field} must be a sequence of numbers, "
                     f"got {config[field]!r}") from e
  if not values or (length is not None and len(values) != length) or min(values) <= 0:
    need = "positive numbers" if length is None else f"{length} positive numbers"
    raise ValueError(f"model_config.{field} must be {need}, got {config[field]!r}")
  return values


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class DetectorStatic:
  """Hashable static description used by the losses (a pytree without leaves, so it can be
  closed over, passed to ``jit`` or marked static)."""
  num_classes: int
  image_size: int
  strides: tuple
  anchor_ratios: tuple
  octave_base_scale: float
  scales_per_octave: int
  box_stds: tuple
  num_anchors_per_level: tuple

  @property
  def anchors(self) -> np.ndarray:
    """``float32 [A, 4]`` xyxy anchors (cached, read-only)."""
    return _anchors(self.image_size, self.strides, self.anchor_ratios, self.octave_base_scale,
                    self.scales_per_octave)[0]

  @property
  def level_index(self) -> np.ndarray:
    """``int32 [A]`` FPN level (0-based) of every anchor."""
    return _anchors(self.image_size, self.strides, self.anchor_ratios, self.octave_base_scale,
                    self.scales_per_octave)[1]

  def decode(self, box_deltas):
    """xyxy boxes ``[..., A, 4]`` from deltas ``[..., A, 4]`` (mmdet's delta coder)."""
    return ops.decode_boxes(jnp.asarray(self.anchors), box_deltas, stds=self.box_stds)


@functools.lru_cache(maxsize=16)
def _anchors(image_size, strides, ratios, octave_base_scale, scales_per_octave):
  anchors, levels = ops.generate_anchors(image_size, strides=strides, ratios=ratios,
                                         octave_base_scale=octave_base_scale,
                                         scales_per_octave=scales_per_octave)
  anchors.setflags(write=False)
  levels.setflags(write=False)
  return anchors, levels


def check_model_config(config) -> DetectorStatic:
  """Validates every field (``ValueError`` naming the field); returns the static info."""
  unknown = sorted(set(config.keys()) - set(_FIELDS))
  if unknown:
    raise ValueError(f"unknown model_config field(s) {unknown}; expected {_FIELDS}")
  missing = [f for f in _FIELDS if f not in config]
  if missing:
    raise ValueError(f"model_config is missing field(s) {missing}")
  _choice(config, "name", DETECTORS)
  _choice(config, "backbone", BACKBONES)
  _choice(config, "norm", NORMS)
  _choice(config, "dtype", tuple(DTYPES))
  _int(config, "frozen_stages", -1, 4)
  if not isinstance(config.pretrained, str):
    raise ValueError(f"model_config.pretrained must be a path string ('' for none), "
                     f"got {config.pretrained!r}")
  if config.pretrained and config.backbone not in RESNET_SPECS:
    raise ValueError(f"model_config.pretrained needs a ResNet backbone, got {config.backbone!r}")
  image_size = _int(config, "image_size", 32)
  num_classes = _int(config, "num_classes", 1)
  _int(config, "fpn_channels", 1)
  _int(config, "min_level", 3, 3)
  max_level = _int(config, "max_level", 5, 7)
  _int(config, "head_convs", 0)
  _int(config, "head_channels", 1)
  _float(config, "prior_prob", 0.0, 1.0)
  ratios = _floats(config, "anchor_ratios")
  octave_base_scale = _float(config, "octave_base_scale", 0.0)
  scales_per_octave = _int(config, "scales_per_octave", 1)
  stds = _floats(config, "box_stds", 4)
  strides = tuple(2 ** level for level in range(3, max_level + 1))
  sizes = ops.num_anchors_per_level(image_size, strides=strides, ratios=ratios,
                                    scales_per_octave=scales_per_octave)
  return DetectorStatic(num_classes, image_size, strides, ratios, octave_base_scale,
                        scales_per_octave, stds, tuple(int(n) for n in sizes))


class DetectorOutputs(NamedTuple):
  """Dense predictions: ``class_logits [B, A, C]`` and ``box_deltas [B, A, 4]``, float32."""
  class_logits: jax.Array
  box_deltas: jax.Array


class Detector(nnx.Module):
  """Backbone + FPN + dense head. Deterministic: no dropout, frozen BatchNorm."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    static = check_model_config(config)
    self._static = static
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
    """What :func:`jaxrank.models.recipes.detection_loss` needs (hashable)."""
    return self._static

  def __call__(self, images) -> DetectorOutputs:
    images = jnp.asarray(images)
    size = self.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"images must be [B, {size}, {size}, 3], got {images.shape}")
    features = self.fpn(self.backbone(images.astype(self.dtype)))
    logits, deltas = self.head(features)
    return DetectorOutputs(logits, deltas)

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


def build_detector(model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> Detector:
  """A :class:`Detector`; loads ``model_config.pretrained`` (torchvision ResNet) if set."""
  detector = Detector(model_config, rngs=rngs)
  if model_config.pretrained:
    from jaxrank.models.pretrained import load_torchvision_resnet  # noqa: PLC0415
    load_torchvision_resnet(detector, model_config.pretrained)
  return detector
