"""Anchor-to-ground-truth assignment for ONE image (``jax.vmap`` over a batch).

Ground truths come padded to a static ``M`` with a boolean ``gt_mask``; padded slots never
match. Both assigners return an :class:`Assignment` of ``[A]`` arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrank.ops.boxes import box_centers, check_boxes, pairwise_iou


class Assignment(NamedTuple):
  """Per-anchor assignment (a pytree).

  Attributes:
    matched_gt: ``int32 [A]`` index of the assigned gt; meaningful only where ``positive``
      (elsewhere the max-IoU valid gt, or 0 when there is none).
    positive: ``bool [A]``.
    ignored: ``bool [A]``, neither positive nor negative. Negatives are
      ``~positive & ~ignored``.
    max_iou: ``float32 [A]`` largest IoU with any valid gt (0 when there is none).
  """
  matched_gt: jax.Array
  positive: jax.Array
  ignored: jax.Array
  max_iou: jax.Array


def _inputs(anchors, gt_boxes, gt_mask):
  anchors = check_boxes(anchors, "anchors")
  gt_boxes = check_boxes(gt_boxes, "gt_boxes")
  if anchors.ndim != 2 or gt_boxes.ndim != 2:
    raise ValueError("anchors must be [A, 4] and gt_boxes [M, 4] (one image; vmap over a "
                     f"batch), got {anchors.shape} and {gt_boxes.shape}.")
  gt_mask = jnp.asarray(gt_mask, bool)
  if gt_mask.shape != gt_boxes.shape[:1]:
    raise ValueError(f"gt_mask must be [M]={gt_boxes.shape[:1]}, got {gt_mask.shape}.")
  return anchors, gt_boxes, gt_mask


def _all_negative(num_anchors):
  return Assignment(jnp.zeros((num_anchors,), jnp.int32), jnp.zeros((num_anchors,), bool),
                    jnp.zeros((num_anchors,), bool), jnp.zeros((num_anchors,), jnp.float32))


def max_iou_assign(anchors, gt_boxes, gt_mask, *, pos_iou: float = 0.5,
                   neg_iou: float = 0.4, min_pos_iou: float = 0.0,
                   match_low_quality: bool = True) -> Assignment:
  """mmdet ``MaxIoUAssigner`` (RetinaNet: ``pos_iou=0.5, neg_iou=0.4, min_pos_iou=0``).

  With ``u`` an anchor's max IoU over valid gts: positive (to the argmax gt) if
  ``u >= pos_iou``, negative if ``u < neg_iou``, ignored otherwise. With
  ``match_low_quality``, for every valid gt ``j`` with ``max_a IoU(a, j) > min_pos_iou``,
  all anchors whose IoU with ``j`` equals that maximum become positive for ``j`` (overriding
  the rule above; on ties between gts the higher index wins, as in mmdet's loop). mmdet
  tests ``>= min_pos_iou``; the strict ``>`` here keeps a gt that overlaps no anchor from
  claiming every zero-IoU anchor. Without valid gts every anchor is negative.
  """
  anchors, gt_boxes, gt_mask = _inputs(anchors, gt_boxes, gt_mask)
  num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
  if num_gts == 0:
    return _all_negative(num_anchors)
  iou = jnp.where(gt_mask[:, None], pairwise_iou(gt_boxes, anchors), -1.0)  # [M, A]
  has_gt = jnp.any(gt_mask)
  max_iou = jnp.maximum(jnp.max(iou, axis=0), 0.0)
  argmax = jnp.argmax(iou, axis=0).astype(jnp.int32)
  positive = has_gt & (max_iou >= pos_iou)
  matched = argmax
  if match_low_quality:
    gt_max = jnp.max(iou, axis=1)
    is_best = (iou == gt_max[:, None]) & (gt_mask & (gt_max > min_pos_iou))[:, None]
    best_gt = jnp.max(jnp.where(is_best, jnp.arange(num_gts, dtype=jnp.int32)[:, None], -1),
                      axis=0)
    low_quality = best_gt >= 0
    matched = jnp.where(low_quality, best_gt, matched)
    positive = positive | low_quality
  ignored = has_gt & ~positive & (max_iou >= neg_iou)
  return Assignment(matched, positive, ignored, max_iou)


def atss_assign(anchors, level_index, num_anchors_per_level: Sequence[int], gt_boxes,
                gt_mask, *, topk: int = 9, min_inside: float = 0.01) -> Assignment:
  """mmdet ``ATSSAssigner`` (Zhang et al., CVPR 2020).

  For each valid gt: on every level take the ``min(topk, n_level)`` anchors with the
  closest centres (Euclidean), threshold their IoUs at ``mean + std`` (``ddof=1`` as
  ``torch.std``; 0 with a single candidate), and make positive the candidates with
  ``IoU >= threshold`` whose centre lies inside the gt with a margin ``> min_inside``
  (mmdet's 0.01). An anchor positive for several gts takes the one of highest IoU. There
  are no ignored anchors; without valid gts every anchor is negative.

  Args:
    anchors: ``[A, 4]`` level-major anchors, as :func:`~jaxrank.ops.anchors.generate_anchors`.
    level_index: ``[A]`` level of every anchor; only its shape is checked, the levels are
      the contiguous static blocks given by ``num_anchors_per_level``.
    num_anchors_per_level: static sizes of the levels, summing to ``A``.
    gt_boxes, gt_mask: ``[M, 4]`` gts and ``bool [M]`` validity.
  """
  anchors, gt_boxes, gt_mask = _inputs(anchors, gt_boxes, gt_mask)
  num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
  sizes = tuple(int(n) for n in num_anchors_per_level)
  if sum(sizes) != num_anchors or any(n < 0 for n in sizes):
    raise ValueError(f"num_anchors_per_level {sizes} must sum to the {num_anchors} anchors.")
  if jnp.shape(level_index) != (num_anchors,):
    raise ValueError(f"level_index must be [A]=({num_anchors},), got {jnp.shape(level_index)}.")
  if topk < 1:
    raise ValueError(f"topk must be >= 1, got {topk}.")
  if num_gts == 0:
    return _all_negative(num_anchors)

  iou = pairwise_iou(gt_boxes, anchors)  # [M, A]
  anchor_ctr = box_centers(anchors)
  gt_ctr = box_centers(gt_boxes)
  dist = jnp.sqrt(jnp.sum((gt_ctr[:, None, :] - anchor_ctr[None, :, :]) ** 2, axis=-1))

  candidates, start = [], 0
  for n in sizes:
    if n > 0:
      _, idx = jax.lax.top_k(-dist[:, start:start + n], min(topk, n))
      candidates.append(idx + start)
    start += n
  cand = jnp.concatenate(candidates, axis=1)  # [M, K]
  cand_iou = jnp.take_along_axis(iou, cand, axis=1)
  num_cand = cand.shape[1]
  mean = jnp.mean(cand_iou, axis=1, keepdims=True)
  std = jnp.std(cand_iou, axis=1, keepdims=True, ddof=1) if num_cand > 1 else 0.0
  is_pos = cand_iou >= mean + std

  ctr = anchor_ctr[cand]  # [M, K, 2]
  margins = jnp.concatenate([ctr - gt_boxes[:, None, :2], gt_boxes[:, None, 2:] - ctr], -1)
  is_pos = is_pos & (jnp.min(margins, axis=-1) > min_inside) & gt_mask[:, None]

  rows = jnp.arange(num_gts)[:, None]
  pos_pairs = jnp.zeros((num_gts, num_anchors), bool).at[rows, cand].set(is_pos)
  pos_iou = jnp.where(pos_pairs, iou, -jnp.inf)
  positive = jnp.any(pos_pairs, axis=0)
  valid_iou = jnp.where(gt_mask[:, None], iou, -1.0)
  matched = jnp.where(positive, jnp.argmax(pos_iou, axis=0),
                      jnp.argmax(valid_iou, axis=0)).astype(jnp.int32)
  max_iou = jnp.maximum(jnp.max(valid_iou, axis=0), 0.0)
  return Assignment(matched, positive, jnp.zeros((num_anchors,), bool), max_iou)
