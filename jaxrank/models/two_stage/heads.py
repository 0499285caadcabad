"""The RPN head and the Shared2FC box head of mmdet's Faster R-CNN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrank.models.layers import Conv, normal_init, xavier_uniform

normal_001 = normal_init(0.01)
normal_0001 = normal_init(0.001)


class Dense(nnx.Module):
  """A fully connected layer ``x @ kernel + bias`` (kernel ``[in, out]``)."""

  def __init__(self, in_features: int, out_features: int, *, kernel_init=xavier_uniform,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
    self.dtype = dtype

  def __call__(self, x):
    x = x.astype(self.dtype)
    return x @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class RPNHead(nnx.Module):
  """mmdet ``RPNHead``: a shared 3x3 conv + ReLU, then 1x1 convs to one objectness logit and
  4 deltas per anchor (normal(0.01) init). Returns ``(logits [B, A], deltas [B, A, 4])`` in
  float32, anchors level-major, then location, then anchor type."""

  def __init__(self, in_channels: int, num_anchors: int, *, channels: int = 256,
               dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(kernel_init=normal_001, dtype=dtype, rngs=rngs)
    self.conv = Conv(in_channels, channels, 3, **kw)
    self.cls = Conv(channels, num_anchors, 1, **kw)
    self.reg = Conv(channels, num_anchors * 4, 1, **kw)

  def __call__(self, features):
    logits, deltas = [], []
    for x in features:
      x = jax.nn.relu(self.conv(x))
      b = x.shape[0]
      logits.append(self.cls(x).reshape(b, -1).astype(jnp.float32))
      deltas.append(self.reg(x).reshape(b, -1, 4).astype(jnp.float32))
    return jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1)


class BoxHead(nnx.Module):
  """mmdet ``Shared2FCBBoxHead``: flattened RoI features -> FC + ReLU -> FC + ReLU, then a
  classifier (normal(0.01)) and a box regressor (normal(0.001)); shared FCs Xavier-uniform.

  ``num_logits`` is ``C`` for a sigmoid classifier (the ranking heads: no background logit)
  or ``C + 1`` for softmax (background last, as mmdet); ``num_box_classes`` is ``C`` for
  class-specific or 1 for class-agnostic regression. Returns ``(logits [..., num_logits],
  deltas [..., num_box_classes, 4])`` in float32.
  """

  def __init__(self, in_features: int, num_logits: int, num_box_classes: int, *,
               channels: int = 1024, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = Dense(in_features, channels, dtype=dtype, rngs=rngs)
    self.fc2 = Dense(channels, channels, dtype=dtype, rngs=rngs)
    self.cls = Dense(channels, num_logits, kernel_init=normal_001, dtype=dtype, rngs=rngs)
    self.reg = Dense(channels, num_box_classes * 4, kernel_init=normal_0001, dtype=dtype,
                     rngs=rngs)
    self.num_box_classes = num_box_classes

  def __call__(self, roi_features):
    x = roi_features.reshape(roi_features.shape[:-3] + (-1,))
    x = jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x))))
    deltas = self.reg(x).astype(jnp.float32)
    return (self.cls(x).astype(jnp.float32),
            deltas.reshape(deltas.shape[:-1] + (self.num_box_classes, 4)))
