"""Classification and box targets from an :class:`~jaxrank.ops.assigners.Assignment`."""

from __future__ import annotations

import jax.numpy as jnp

from jaxrank.ops.boxes import check_boxes


def _gather(values, matched):
  if values.shape[0] == 0:
    return jnp.zeros(matched.shape + values.shape[1:], values.dtype)
  return values[matched]


def classification_targets(assignment, gt_labels, num_classes: int, *, iou_targets=None):
  """``float32 [A, C]`` targets in the layout of the ranking-based losses.

  All zeros, except ``t[a, gt_labels[matched_gt[a]]] = 1`` for every positive anchor
  ``a`` and the whole row ``-1`` for every ignored anchor. With ``iou_targets [A]`` (e.g.
  the IoU of each prediction with its gt, for Rank & Sort) the positive entry holds that
  value instead of 1; a positive whose value is exactly 0 then looks like a negative in
  ``t``, so use ``assignment.positive`` to find positives.

  Args:
    assignment: an ``Assignment`` for one image.
    gt_labels: ``int32 [M]`` classes in ``[0, num_classes)`` (no background class).
    num_classes: static ``C``.
    iou_targets: optional ``[A]`` values for the positive entries.
  """
  gt_labels = jnp.asarray(gt_labels, jnp.int32)
  positive = jnp.asarray(assignment.positive, bool)
  if gt_labels.ndim != 1:
    raise ValueError(f"gt_labels must be [M], got {gt_labels.shape}.")
  if positive.ndim != 1:
    raise ValueError(f"assignment must be for one image ([A] arrays), got {positive.shape}.")
  labels = _gather(gt_labels, assignment.matched_gt)
  value = jnp.ones(positive.shape, jnp.float32)
  if iou_targets is not None:
    value = jnp.asarray(iou_targets, jnp.float32)
    if value.shape != positive.shape:
      raise ValueError(f"iou_targets must be [A]={positive.shape}, got {value.shape}.")
  onehot = labels[:, None] == jnp.arange(num_classes, dtype=jnp.int32)[None, :]
  targets = jnp.where(onehot & positive[:, None], value[:, None], 0.0)
  return jnp.where(jnp.asarray(assignment.ignored, bool)[:, None], -1.0, targets)


def box_targets(assignment, gt_boxes):
  """``float32 [A, 4]``: the matched gt box of every positive anchor, zeros elsewhere."""
  gt_boxes = check_boxes(gt_boxes, "gt_boxes")
  if gt_boxes.ndim != 2:
    raise ValueError(f"gt_boxes must be [M, 4], got {gt_boxes.shape}.")
  boxes = _gather(gt_boxes, assignment.matched_gt)
  return jnp.where(jnp.asarray(assignment.positive, bool)[:, None], boxes, 0.0)
