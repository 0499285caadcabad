"""Two-stage detector glue for ONE image: RPN proposals, RoI sampling and gt proposals.

These are the steps of an mmdet 2.x Faster R-CNN between the RPN and the RoI head. All of
them are jit-able with static shapes (callers ``jax.vmap`` over a batch); outputs are padded
to a fixed size with a ``valid`` mask.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrank.ops.boxes import check_boxes, clip_boxes, valid_boxes
from jaxrank.ops.postprocess import batched_nms


class Proposals(NamedTuple):
  """Padded proposals of one image: ``boxes [K, 4]`` xyxy, ``scores [K]`` (objectness
  probabilities) and ``valid bool [K]``; padded slots hold zero boxes, score 0, valid False."""
  boxes: jax.Array
  scores: jax.Array
  valid: jax.Array


def _positive_int(value, name: str) -> int:
  """``value`` as a Python int ``>= 1``; ``ValueError`` naming ``name`` otherwise."""
  try:
    number = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be a static int >= 1, got {value!r}.") from None
  if number < 1:
    raise ValueError(f"{name} must be >= 1, got {number}.")
  return number


def _image_hw(image_size):
  """``image_size`` (an int, or ``(h, w)``, possibly traced) as a float32 ``[2]`` array."""
  size = jnp.asarray(image_size, jnp.float32)
  if size.ndim == 0:
    return jnp.stack([size, size])
  if size.shape != (2,):
    raise ValueError(f"image_size must be an int or (h, w), got shape {size.shape}.")
  return size


def rpn_proposals(objectness_logits, boxes, num_anchors_per_level: Sequence[int], *,
                  image_size, nms_pre: int = 2000, nms_post: int = 1000,
                  iou_threshold: float = 0.7, min_size: float = 0.0) -> Proposals:
  """RPN proposals as mmdet 2.x ``RPNHead._get_bboxes_single`` + ``_bbox_post_process``.

  Scores are ``sigmoid(objectness_logits)``. Each level keeps its ``min(nms_pre, n_l)``
  highest-scoring anchors; their boxes are clipped to the image (x to ``[0, w]``, y to
  ``[0, h]``); boxes with width or height ``<= min_size`` are dropped (a negative
  ``min_size`` disables this filter, as mmdet's ``min_bbox_size < 0``); greedy NMS at
  ``iou_threshold`` runs within each level (levels never suppress each other, see
  :func:`~jaxrank.ops.postprocess.batched_nms` for the IoU convention) and the ``nms_post``
  highest-scoring survivors over all levels are returned by decreasing score.

  No gradient flows into the proposals (the inputs are wrapped in ``stop_gradient``).

  Args:
    objectness_logits: ``[A]``. boxes: ``[A, 4]`` decoded xyxy boxes, level-major.
    num_anchors_per_level: static level sizes summing to ``A``.
    image_size: an int (square image) or ``(h, w)``; may be traced.
    nms_pre: static per-level candidate count (``>= 1``).
    nms_post: static number of output slots ``K`` (``>= 1``).

  Returns:
    :class:`Proposals` with ``K = nms_post`` slots; fewer survivors are padded at the end.
  """
  nms_pre = _positive_int(nms_pre, "nms_pre")
  nms_post = _positive_int(nms_post, "nms_post")
  logits = jax.lax.stop_gradient(jnp.asarray(objectness_logits, jnp.float32))
  boxes = jax.lax.stop_gradient(check_boxes(boxes))
  if logits.ndim != 1 or boxes.shape != (logits.shape[0], 4):
    raise ValueError(f"objectness_logits must be [A] and boxes [A, 4], got {logits.shape} and "
                     f"{boxes.shape}.")
  num_anchors = logits.shape[0]
  sizes = tuple(operator.index(n) for n in num_anchors_per_level)
  if any(n < 0 for n in sizes) or sum(sizes) != num_anchors:
    raise ValueError(f"num_anchors_per_level {sizes} must be non-negative and sum to the "
                     f"{num_anchors} anchors.")
  hw = _image_hw(image_size)
  scores = jax.nn.sigmoid(logits)

  cand_scores, cand_index, cand_level, start = [], [], [], 0
  for level, n in enumerate(sizes):
    if n > 0:
      top, idx = jax.lax.top_k(scores[start:start + n], min(nms_pre, n))
      cand_scores.append(top)
      cand_index.append(idx + start)
      cand_level.append(jnp.full(idx.shape, level, jnp.int32))
    start += n
  if not cand_scores:
    return Proposals(jnp.zeros((nms_post, 4)), jnp.zeros((nms_post,)),
                     jnp.zeros((nms_post,), bool))
  cand_scores = jnp.concatenate(cand_scores)
  cand_boxes = clip_boxes(boxes[jnp.concatenate(cand_index)], hw)
  cand_level = jnp.concatenate(cand_level)
  big_enough = valid_boxes(cand_boxes, min_size=min_size) | (jnp.asarray(min_size) < 0)

  keep, valid = batched_nms(cand_boxes, cand_scores, cand_level, iou_threshold=iou_threshold,
                            max_output=nms_post, mask=big_enough)
  return Proposals(jnp.where(valid[:, None], cand_boxes[keep], 0.0),
                   jnp.where(valid, cand_scores[keep], 0.0), valid)


def random_sample(key, positive, negative, *, num: int = 512, pos_fraction: float = 0.25):
  """Uniform random sampling of positives and negatives, as mmdet's ``RandomSampler``.

  Takes ``min(#positives, int(num * pos_fraction))`` positives uniformly at random without
  replacement, then ``min(#negatives, num - sampled_positives)`` negatives likewise
  (the mmdet RoI head uses ``num=512, pos_fraction=0.25``, the RPN ``num=256,
  pos_fraction=0.5``). The result depends only on ``key`` and the masks. A candidate marked
  both positive and negative counts as positive.

  The output always has ``num`` slots: sampled positives first (in random order), then
  sampled negatives, then padding (index 0, ``valid`` False) when fewer than ``num``
  candidates are available (where mmdet would return fewer samples).

  Random priorities are 31-bit integers (ties, broken by index, are negligibly rare).

  Args:
    key: a PRNG key. positive, negative: ``bool [N]``.
    num: static number of samples (``>= 1``). pos_fraction: static, in ``[0, 1]``.

  Returns:
    ``(indices int32 [num], valid bool [num], is_positive bool [num])``; ``is_positive`` is
    False in padded slots.
  """
  num = _positive_int(num, "num")
  if isinstance(pos_fraction, jax.core.Tracer) or np.ndim(pos_fraction) != 0:
    raise ValueError(f"pos_fraction must be a static float, got {pos_fraction!r}.")
  fraction = float(pos_fraction)
  if math.isnan(fraction) or not 0.0 <= fraction <= 1.0:
    raise ValueError(f"pos_fraction must be in [0, 1], got {fraction}.")
  positive = jnp.asarray(positive, bool)
  negative = jnp.asarray(negative, bool)
  if positive.ndim != 1 or negative.shape != positive.shape:
    raise ValueError(f"positive and negative must both be bool [N], got {positive.shape} and "
                     f"{negative.shape}.")
  negative = negative & ~positive
  n = positive.shape[0]
  if n == 0:
    return jnp.zeros((num,), jnp.int32), jnp.zeros((num,), bool), jnp.zeros((num,), bool)

  max_positives = int(num * fraction)
  priority = (jax.random.bits(key, (n,), jnp.uint32) >> 1).astype(jnp.int32)
  num_pos = jnp.minimum(jnp.sum(positive, dtype=jnp.int32), max_positives)
  num_neg = jnp.minimum(jnp.sum(negative, dtype=jnp.int32), num - num_pos)
  slots = jnp.arange(num, dtype=jnp.int32)

  _, neg_index = jax.lax.top_k(jnp.where(negative, priority, -1), min(num, n))
  chosen = neg_index[jnp.clip(slots - num_pos, 0, neg_index.shape[0] - 1)]
  if max_positives > 0:
    _, pos_index = jax.lax.top_k(jnp.where(positive, priority, -1), min(max_positives, n))
    chosen = jnp.where(slots < num_pos,
                       pos_index[jnp.clip(slots, 0, pos_index.shape[0] - 1)], chosen)
  valid = slots < num_pos + num_neg
  return jnp.where(valid, chosen, 0).astype(jnp.int32), valid, slots < num_pos


def append_gt_boxes(proposals: Proposals, gt_boxes, gt_mask) -> Proposals:
  """Appends the ground-truth boxes as proposals (mmdet's ``add_gt_as_proposals``).

  mmdet puts them before the proposals; here they follow them: the result has ``K + M``
  slots, the last ``M`` holding ``gt_boxes`` with score 1 and ``valid = gt_mask`` (padded
  gt slots get a zero box and score 0).

  Args:
    proposals: :class:`Proposals` with ``K`` slots. gt_boxes: ``[M, 4]`` xyxy.
    gt_mask: ``bool [M]``.
  """
  gt_boxes = check_boxes(gt_boxes, "gt_boxes")
  gt_mask = jnp.asarray(gt_mask, bool)
  if gt_boxes.ndim != 2 or gt_mask.shape != gt_boxes.shape[:1]:
    raise ValueError(f"gt_boxes must be [M, 4] and gt_mask [M], got {gt_boxes.shape} and "
                     f"{gt_mask.shape}.")
  gt_boxes = jax.lax.stop_gradient(jnp.where(gt_mask[:, None], gt_boxes, 0.0))
  return Proposals(
      jnp.concatenate([jnp.asarray(proposals.boxes, jnp.float32), gt_boxes]),
      jnp.concatenate([jnp.asarray(proposals.scores, jnp.float32),
                       gt_mask.astype(jnp.float32)]),
      jnp.concatenate([jnp.asarray(proposals.valid, bool), gt_mask]))
