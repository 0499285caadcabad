"""Jit-able greedy NMS and RetinaNet-style detection post-processing for ONE image.

Shapes are static: NMS walks the score-sorted candidates with a ``lax.while_loop``
(computing one IoU row per kept box, so memory is ``O(K)``) and stops after
``max_output`` boxes are kept; outputs are padded to ``max_output`` with a ``valid`` mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrank.ops.boxes import aligned_iou, check_boxes


class Detections(NamedTuple):
  """Padded detections of one image: ``boxes [D, 4]`` xyxy, ``scores [D]``,
  ``classes int32 [D]`` and ``valid bool [D]``; padded slots hold zeros."""
  boxes: jax.Array
  scores: jax.Array
  classes: jax.Array
  valid: jax.Array


def _concrete_float(value, name: str) -> float | None:
  """``value`` as a Python float, or None when it is traced (known only under jit)."""
  if isinstance(value, jax.core.Tracer):
    return None
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}.")
  return float(value)


def _check_iou_threshold(iou_threshold):
  """Raises ``ValueError`` for a concrete ``iou_threshold`` that is NaN or outside ``[0, 1]``;
  returns a traced one's validity as a bool scalar (True for a concrete one)."""
  value = _concrete_float(iou_threshold, "iou_threshold")
  if value is None:
    return (iou_threshold >= 0.0) & (iou_threshold <= 1.0)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"iou_threshold must be in [0, 1], got {value}.")
  return jnp.bool_(True)


def batched_nms(boxes, scores, classes, *, iou_threshold: float = 0.5, max_output: int,
                mask=None):
  """Class-wise greedy NMS (boxes of different classes never suppress each other).

  Boxes are visited by decreasing score (stable for ties); a visited box is kept unless an
  earlier kept box of the same class has IoU ``> iou_threshold`` with it, so a box whose
  IoU equals the threshold exactly is kept (torchvision / mmcv convention). Boxes with
  ``mask`` False are never kept.

  ``iou_threshold`` must lie in ``[0, 1]``: a concrete NaN or out-of-range value raises
  ``ValueError``; a traced one (under jit) that is invalid keeps no box (``valid`` all False).

  Args:
    boxes: ``[N, 4]`` xyxy. scores: ``[N]``. classes: ``int [N]`` or None.
    max_output: static number of output slots.
    mask: optional ``bool [N]``.

  Returns:
    ``(indices int32 [max_output], valid bool [max_output])``: indices into the inputs of
    the kept boxes by decreasing score; padded slots hold index 0 and ``valid`` False.
  """
  threshold_ok = _check_iou_threshold(iou_threshold)
  boxes = check_boxes(boxes)
  scores = jnp.asarray(scores, jnp.float32)
  n = boxes.shape[0]
  if boxes.ndim != 2 or scores.shape != (n,):
    raise ValueError(f"boxes must be [N, 4] and scores [N], got {boxes.shape}, {scores.shape}.")
  classes = (jnp.zeros((n,), jnp.int32) if classes is None
             else jnp.asarray(classes, jnp.int32))
  mask = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask, bool)
  if classes.shape != (n,) or mask.shape != (n,):
    raise ValueError(f"classes and mask must be [N]=({n},), got {classes.shape}, {mask.shape}.")
  mask = mask & threshold_ok
  max_output = int(max_output)
  if n == 0 or max_output <= 0:
    return jnp.zeros((max(max_output, 0),), jnp.int32), jnp.zeros((max(max_output, 0),), bool)

  order = jnp.argsort(jnp.where(mask, -scores, jnp.inf), stable=True)
  boxes, classes, active = boxes[order], classes[order], mask[order]
  positions = jnp.arange(n)

  def cond(state):
    i, count, _, _ = state
    return (i < n) & (count < max_output)

  def body(state):
    i, count, active, kept = state
    kept = kept.at[count].set(i)
    iou = aligned_iou(boxes[i], boxes)
    suppress = (iou > iou_threshold) & (classes == classes[i])
    active = active & ~suppress & (positions > i)
    nxt = jnp.where(jnp.any(active), jnp.argmax(active), n).astype(jnp.int32)
    return nxt, count + 1, active, kept

  first = jnp.where(jnp.any(active), jnp.argmax(active), n)
  init = (first.astype(jnp.int32), jnp.int32(0), active, jnp.zeros((max_output,), jnp.int32))
  _, count, _, kept = jax.lax.while_loop(cond, body, init)
  valid = jnp.arange(max_output) < count
  return jnp.where(valid, order[kept], 0).astype(jnp.int32), valid


def nms(boxes, scores, *, iou_threshold: float = 0.5, max_output: int, mask=None):
  """Plain greedy NMS over all boxes; see :func:`batched_nms` for the convention."""
  return batched_nms(boxes, scores, None, iou_threshold=iou_threshold,
                     max_output=max_output, mask=mask)


def postprocess_detections(class_logits, boxes, *,
                           num_anchors_per_level: Sequence[int] | None = None,
                           score_threshold: float = 0.05, pre_nms_top_k: int = 1000,
                           iou_threshold: float = 0.5,
                           max_detections: int = 100) -> Detections:
  """RetinaNet test-time post-processing (mmdet >= 2.18 ``filter_scores_and_topk``).

  Scores are ``sigmoid(class_logits)``. Candidates are the ``pre_nms_top_k`` highest
  (anchor, class) pairs of every level (of the whole image when ``num_anchors_per_level``
  is None) with score ``> score_threshold``; class-wise NMS at ``iou_threshold`` (see
  :func:`batched_nms`; IoU equal to the threshold does not suppress) then keeps at most
  ``max_detections`` of them, by decreasing score.

  A concrete NaN ``score_threshold`` or an ``iou_threshold`` that is NaN or outside
  ``[0, 1]`` raises ``ValueError``; traced ones (under jit) give no valid detection.

  Args:
    class_logits: ``[A, C]``. boxes: ``[A, 4]`` decoded xyxy boxes.
    num_anchors_per_level: static level sizes (level-major anchors), or None.

  Returns:
    :class:`Detections` with ``D = max_detections`` slots.
  """
  _check_iou_threshold(iou_threshold)
  score_value = _concrete_float(score_threshold, "score_threshold")
  if score_value is not None and math.isnan(score_value):
    raise ValueError("score_threshold must not be NaN.")
  logits = jnp.asarray(class_logits, jnp.float32)
  boxes = check_boxes(boxes)
  if logits.ndim != 2 or boxes.ndim != 2 or boxes.shape[0] != logits.shape[0]:
    raise ValueError(f"class_logits must be [A, C] and boxes [A, 4], got {logits.shape} and "
                     f"{boxes.shape}.")
  num_anchors, num_classes = logits.shape
  sizes = (num_anchors,) if num_anchors_per_level is None else tuple(
      int(n) for n in num_anchors_per_level)
  if sum(sizes) != num_anchors:
    raise ValueError(f"num_anchors_per_level {sizes} must sum to the {num_anchors} anchors.")
  scores = jax.nn.sigmoid(logits)

  cand_scores, cand_pairs, start = [], [], 0
  for n in sizes:
    if n > 0:
      flat = scores[start:start + n].reshape(-1)
      top, idx = jax.lax.top_k(flat, min(int(pre_nms_top_k), flat.shape[0]))
      cand_scores.append(top)
      cand_pairs.append(idx + start * num_classes)
    start += n
  if not cand_scores:
    d = int(max_detections)
    return Detections(jnp.zeros((d, 4)), jnp.zeros((d,)), jnp.zeros((d,), jnp.int32),
                      jnp.zeros((d,), bool))
  cand_scores = jnp.concatenate(cand_scores)
  pairs = jnp.concatenate(cand_pairs)
  cand_anchor, cand_class = pairs // num_classes, (pairs % num_classes).astype(jnp.int32)
  return _nms_candidates(boxes[cand_anchor], cand_scores, cand_class,
                         score_threshold=score_threshold, iou_threshold=iou_threshold,
                         max_detections=max_detections)


def _nms_candidates(boxes, scores, classes, *, score_threshold, iou_threshold, max_detections,
                    mask=None):
  keep_mask = scores > score_threshold
  if mask is not None:
    keep_mask = keep_mask & mask
  keep, valid = batched_nms(boxes, scores, classes, iou_threshold=iou_threshold,
                            max_output=max_detections, mask=keep_mask)
  return Detections(jnp.where(valid[:, None], boxes[keep], 0.0),
                    jnp.where(valid, scores[keep], 0.0),
                    jnp.where(valid, classes[keep], 0).astype(jnp.int32), valid)


def multiclass_nms(scores, boxes, *, mask=None, score_threshold: float = 0.05,
                   pre_nms_top_k: int = 1000, iou_threshold: float = 0.5,
                   max_detections: int = 100) -> Detections:
  """Two-stage test-time post-processing (mmdet's ``multiclass_nms``) for ONE image.

  Every (box, class) pair with score ``> score_threshold`` is a candidate; the
  ``pre_nms_top_k`` best candidates go through class-wise NMS at ``iou_threshold`` (see
  :func:`batched_nms`), which keeps at most ``max_detections`` by decreasing score. mmdet
  has no ``pre_nms_top_k`` here: with the R-CNN's 1000 RoIs and 100 detections, 1000
  candidates change nothing in practice and keep the shapes small.

  Args:
    scores: ``[R, C]`` class probabilities (sigmoid or softmax without the background).
    boxes: ``[R, 4]`` (class-agnostic) or ``[R, C, 4]`` (class-specific) xyxy boxes.
    mask: optional ``bool [R]``; False rows (padding) are never detected.

  Returns:
    :class:`Detections` with ``D = max_detections`` slots.
  """
  _check_iou_threshold(iou_threshold)
  score_value = _concrete_float(score_threshold, "score_threshold")
  if score_value is not None and math.isnan(score_value):
    raise ValueError("score_threshold must not be NaN.")
  scores = jnp.asarray(scores, jnp.float32)
  boxes = check_boxes(boxes)
  if scores.ndim != 2 or boxes.shape[0] != scores.shape[0] or boxes.ndim not in (2, 3) or (
      boxes.ndim == 3 and boxes.shape[1] != scores.shape[1]):
    raise ValueError(f"scores must be [R, C] and boxes [R, 4] or [R, C, 4], got {scores.shape} "
                     f"and {boxes.shape}.")
  num_rows, num_classes = scores.shape
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    if mask.shape != (num_rows,):
      raise ValueError(f"mask must be [R]=({num_rows},), got {mask.shape}.")
    scores = jnp.where(mask[:, None], scores, -1.0)
  flat = scores.reshape(-1)
  top, pairs = jax.lax.top_k(flat, min(int(pre_nms_top_k), flat.shape[0]))
  rows, classes = pairs // num_classes, (pairs % num_classes).astype(jnp.int32)
  cand_boxes = boxes[rows] if boxes.ndim == 2 else boxes[rows, classes]
  return _nms_candidates(cand_boxes, top, classes, score_threshold=score_threshold,
                         iou_threshold=iou_threshold, max_detections=max_detections,
                         mask=top >= 0.0)
