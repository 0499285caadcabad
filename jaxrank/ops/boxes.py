"""Box geometry: areas, IoU and GIoU, aligned and pairwise.

Boxes are ``[..., 4]`` arrays in ``(x1, y1, x2, y2)`` corner format. Every function is
jit-able, works on any leading shape and computes in float32.
"""

from __future__ import annotations

import jax.numpy as jnp

# Added to unions and enclosing areas, as mmdet's ``bbox_overlaps`` does.
EPS = 1e-6


def check_boxes(boxes, name: str = "boxes"):
  """Returns ``boxes`` as float32; raises ``ValueError`` unless its last dim is 4."""
  boxes = jnp.asarray(boxes, jnp.float32)
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f"{name} must have shape [..., 4], got {boxes.shape}.")
  return boxes


def box_area(boxes):
  """Area of ``(x1, y1, x2, y2)`` boxes; zero for degenerate boxes."""
  boxes = check_boxes(boxes)
  wh = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 0.0)
  return wh[..., 0] * wh[..., 1]


def aligned_iou_giou(boxes1, boxes2, *, eps: float = EPS):
  """IoU and generalised IoU of corresponding boxes.

  Args:
    boxes1, boxes2: ``[..., 4]`` boxes, broadcastable against each other.
    eps: added to the union and the enclosing area.

  Returns:
    ``(iou, giou)``, each of the broadcast leading shape. ``giou = iou - (C - U) / C``
    with ``C`` the area of the smallest enclosing box and ``U`` the union (Rezatofighi
    et al., CVPR 2019).
  """
  b1 = check_boxes(boxes1, "boxes1")
  b2 = check_boxes(boxes2, "boxes2")
  lt = jnp.maximum(b1[..., :2], b2[..., :2])
  rb = jnp.minimum(b1[..., 2:], b2[..., 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(b1) + box_area(b2) - inter + eps
  iou = inter / union
  enc_lt = jnp.minimum(b1[..., :2], b2[..., :2])
  enc_rb = jnp.maximum(b1[..., 2:], b2[..., 2:])
  enc_wh = jnp.maximum(enc_rb - enc_lt, 0.0)
  enclosing = enc_wh[..., 0] * enc_wh[..., 1] + eps
  giou = iou - (enclosing - union) / enclosing
  return iou, giou


def aligned_iou(boxes1, boxes2, *, eps: float = EPS):
  """IoU of corresponding boxes (see :func:`aligned_iou_giou`)."""
  return aligned_iou_giou(boxes1, boxes2, eps=eps)[0]


def aligned_giou(boxes1, boxes2, *, eps: float = EPS):
  """Generalised IoU of corresponding boxes, in ``[-1, 1]``."""
  return aligned_iou_giou(boxes1, boxes2, eps=eps)[1]


def pairwise_iou_giou(boxes1, boxes2, *, eps: float = EPS):
  """IoU and GIoU of every box in ``boxes1 [..., n, 4]`` with every box in ``boxes2 [..., m, 4]``.

  Returns ``(iou, giou)``, each ``[..., n, m]``.
  """
  b1 = check_boxes(boxes1, "boxes1")
  b2 = check_boxes(boxes2, "boxes2")
  if b1.ndim < 2 or b2.ndim < 2:
    raise ValueError(f"pairwise boxes must be [..., n, 4], got {b1.shape} and {b2.shape}.")
  b1 = b1[..., :, None, :]
  b2 = b2[..., None, :, :]
  return aligned_iou_giou(b1, b2, eps=eps)


def pairwise_iou(boxes1, boxes2, *, eps: float = EPS):
  """Pairwise IoU ``[..., n, m]`` (see :func:`pairwise_iou_giou`)."""
  return pairwise_iou_giou(boxes1, boxes2, eps=eps)[0]


def pairwise_giou(boxes1, boxes2, *, eps: float = EPS):
  """Pairwise GIoU ``[..., n, m]`` (see :func:`pairwise_iou_giou`)."""
  return pairwise_iou_giou(boxes1, boxes2, eps=eps)[1]


def box_xyxy_to_cxcywh(boxes):
  """``(x1, y1, x2, y2) -> (cx, cy, w, h)`` with ``w = x2 - x1`` (no ``+1``)."""
  b = check_boxes(boxes)
  return jnp.concatenate([(b[..., :2] + b[..., 2:]) * 0.5, b[..., 2:] - b[..., :2]], axis=-1)


def box_cxcywh_to_xyxy(boxes):
  """``(cx, cy, w, h) -> (x1, y1, x2, y2)``."""
  b = check_boxes(boxes)
  half = b[..., 2:] * 0.5
  return jnp.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)


def box_xyxy_to_xywh(boxes):
  """``(x1, y1, x2, y2) -> (x1, y1, w, h)`` (COCO format)."""
  b = check_boxes(boxes)
  return jnp.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], axis=-1)


def box_xywh_to_xyxy(boxes):
  """``(x1, y1, w, h) -> (x1, y1, x2, y2)``."""
  b = check_boxes(boxes)
  return jnp.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)


def box_centers(boxes):
  """Centres ``[..., 2]`` as ``(cx, cy)``."""
  b = check_boxes(boxes)
  return (b[..., :2] + b[..., 2:]) * 0.5


def clip_boxes(boxes, image_size):
  """Clips x to ``[0, w]`` and y to ``[0, h]``.

  ``image_size`` is ``(h, w)``, or ``[..., 2]`` per image for boxes ``[..., n, 4]``.
  """
  b = check_boxes(boxes)
  size = jnp.asarray(image_size, jnp.float32)
  if size.shape[-1:] != (2,):
    raise ValueError(f"image_size must be (h, w) or [..., 2], got {size.shape}.")
  if size.ndim == 1:
    h, w = size[0], size[1]
  else:
    h, w = size[..., 0, None, None], size[..., 1, None, None]
  x = jnp.clip(b[..., 0::2], 0.0, w)
  y = jnp.clip(b[..., 1::2], 0.0, h)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def valid_boxes(boxes, *, min_size: float = 0.0):
  """``True`` where width and height are both ``> min_size``."""
  b = check_boxes(boxes)
  wh = b[..., 2:] - b[..., :2]
  return (wh[..., 0] > min_size) & (wh[..., 1] > min_size)
