"""Box <-> delta coding as mmdet's ``DeltaXYWHBBoxCoder``.

For an anchor ``(px, py, pw, ph)`` and a box ``(gx, gy, gw, gh)`` in centre/size form
(``w = x2 - x1``, no ``+1``)::

  d = ((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph))
  deltas = (d - means) / stds
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxrank.ops.boxes import box_xyxy_to_cxcywh, check_boxes, clip_boxes

DEFAULT_MEANS = (0.0, 0.0, 0.0, 0.0)
DEFAULT_STDS = (0.1, 0.1, 0.2, 0.2)
DEFAULT_MAX_RATIO = abs(math.log(16.0 / 1000.0))
# Lower bound on widths and heights, so that zero-size (padded) targets stay finite.
MIN_SIZE = 1e-6


def _vec4(values, name):
  v = jnp.asarray(values, jnp.float32)
  if v.shape != (4,):
    raise ValueError(f"{name} must have 4 entries, got shape {v.shape}.")
  return v


def encode_boxes(anchors, boxes, *, means=DEFAULT_MEANS, stds=DEFAULT_STDS):
  """Deltas ``[..., 4]`` that map ``anchors`` onto ``boxes`` (both ``[..., 4]`` xyxy).

  Widths and heights are clamped to ``>= 1e-6`` before the log, so zero boxes (e.g. the
  targets of non-positive anchors) give large but finite deltas.
  """
  a = box_xyxy_to_cxcywh(check_boxes(anchors, "anchors"))
  g = box_xyxy_to_cxcywh(check_boxes(boxes, "boxes"))
  awh = jnp.maximum(a[..., 2:], MIN_SIZE)
  gwh = jnp.maximum(g[..., 2:], MIN_SIZE)
  d = jnp.concatenate([(g[..., :2] - a[..., :2]) / awh, jnp.log(gwh / awh)], axis=-1)
  return (d - _vec4(means, "means")) / _vec4(stds, "stds")


def decode_boxes(anchors, deltas, *, means=DEFAULT_MEANS, stds=DEFAULT_STDS,
                 max_ratio: float = DEFAULT_MAX_RATIO, clip_to=None):
  """Inverse of :func:`encode_boxes`: xyxy boxes ``[..., 4]``.

  ``dw, dh`` (after de-normalisation) are clamped to ``[-max_ratio, max_ratio]``. With
  ``clip_to = (h, w)`` (or ``[..., 2]``, see :func:`~jaxrank.ops.boxes.clip_boxes`) x is
  clipped to ``[0, w]`` and y to ``[0, h]``.
  """
  a = box_xyxy_to_cxcywh(check_boxes(anchors, "anchors"))
  d = check_boxes(deltas, "deltas") * _vec4(stds, "stds") + _vec4(means, "means")
  dwh = jnp.clip(d[..., 2:], -max_ratio, max_ratio)
  wh = a[..., 2:] * jnp.exp(dwh)
  ctr = a[..., :2] + a[..., 2:] * d[..., :2]
  boxes = jnp.concatenate([ctr - 0.5 * wh, ctr + 0.5 * wh], axis=-1)
  if clip_to is not None:
    boxes = clip_boxes(boxes, clip_to)
  return boxes
