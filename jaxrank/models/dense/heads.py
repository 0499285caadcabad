"""Dense detection heads shared across FPN levels.

Both return ``(class_logits [B, A, C], box_deltas [B, A, 4])`` in float32, anchors ordered
level-major, then location (row-major), then anchor type, as
:func:`jaxrank.ops.generate_anchors`; an ATSS head with ``centerness`` also returns
``centerness_logits [B, A]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrank.models.layers import Conv, GroupNorm, normal_init

normal_001 = normal_init(0.01)


def prior_bias(prior_prob: float):
  """``-log((1 - p) / p)``: every initial score is ``p``."""
  return nnx.initializers.constant(-math.log((1.0 - prior_prob) / prior_prob))


def _flatten(x, last: int):
  b, h, w, _ = x.shape
  return x.reshape(b, h * w * (x.shape[-1] // last), last).astype(jnp.float32)


class _DenseHead(nnx.Module):

  def __init__(self, in_channels, num_anchors, num_classes, *, num_convs, channels, prior_prob,
               group_norm, num_levels, dtype, rngs, centerness=False):
    def tower():
      convs, norms = [], []
      for i in range(num_convs):
        convs.append(Conv(in_channels if i == 0 else channels, channels, 3,
                          use_bias=not group_norm, kernel_init=normal_001, dtype=dtype, rngs=rngs))
        if group_norm:
          norms.append(GroupNorm(channels, dtype=dtype))
      return nnx.List(convs), nnx.List(norms)

    last = channels if num_convs else in_channels
    self.cls_convs, self.cls_norms = tower()
    self.reg_convs, self.reg_norms = tower()
    self.cls_out = Conv(last, num_anchors * num_classes, 3, kernel_init=normal_001,
                        bias_init=prior_bias(prior_prob), dtype=dtype, rngs=rngs)
    self.reg_out = Conv(last, num_anchors * 4, 3, kernel_init=normal_001, dtype=dtype, rngs=rngs)
    self.centerness_out = (Conv(last, num_anchors, 3, kernel_init=normal_001, dtype=dtype,
                                rngs=rngs) if centerness else None)
    self.scales = (nnx.Param(jnp.ones((num_levels,), jnp.float32)) if group_norm else None)
    self.num_classes = num_classes

  @staticmethod
  def _tower(convs, norms, x):
    for i, conv in enumerate(convs):
      x = conv(x)
      if len(norms):
        x = norms[i](x)
      x = jax.nn.relu(x)
    return x

  def __call__(self, features):
    logits, deltas, centerness = [], [], []
    for level, x in enumerate(features):
      cls = self.cls_out(self._tower(self.cls_convs, self.cls_norms, x))
      reg_features = self._tower(self.reg_convs, self.reg_norms, x)
      reg = self.reg_out(reg_features)
      if self.scales is not None:
        reg = reg * self.scales[level].astype(reg.dtype)
      logits.append(_flatten(cls, self.num_classes))
      deltas.append(_flatten(reg, 4))
      if self.centerness_out is not None:
        centerness.append(_flatten(self.centerness_out(reg_features), 1)[..., 0])
    outputs = (jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1))
    if self.centerness_out is not None:
      outputs += (jnp.concatenate(centerness, axis=1),)
    return outputs


class RetinaHead(_DenseHead):
  """RetinaNet head (Lin et al., ICCV 2017): two towers of ``num_convs`` 3x3 conv + ReLU,
  normal(0.01) init, class bias from ``prior_prob``."""

  def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *, num_convs: int = 4,
               channels: int = 256, prior_prob: float = 0.01, num_levels: int = 5,
               dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(in_channels, num_anchors, num_classes, num_convs=num_convs, channels=channels,
                     prior_prob=prior_prob, group_norm=False, num_levels=num_levels, dtype=dtype,
                     rngs=rngs)


class ATSSHead(_DenseHead):
  """ATSS head: towers of conv + GroupNorm(32) + ReLU and a learnable per-level scale on the
  box deltas; without centerness as the RS/BR repos' ``RankBasedATSSHead``, with
  (``centerness``: a 3x3 conv on the box tower) as mmdet's ``ATSSHead``."""

  def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *, num_convs: int = 4,
               channels: int = 256, prior_prob: float = 0.01, num_levels: int = 5,
               centerness: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(in_channels, num_anchors, num_classes, num_convs=num_convs, channels=channels,
                     prior_prob=prior_prob, group_norm=True, num_levels=num_levels, dtype=dtype,
                     rngs=rngs, centerness=centerness)
