"""Synthetic shapes detection dataset, deterministic from a seed and drawn in memory.

Each image has a textured background (smooth noise, a gradient or stripes) and 1 to
``max_objects`` filled shapes of random colour, size and aspect ratio. Objects are drawn
from largest to smallest and placed so that no two boxes overlap by more than
``max_iou`` and no object has more than half of its box covered, which keeps every
target visible. Boxes are the tight pixel extents of the drawn shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxrank.data.dataset import DetectionDataset, Record

SHAPE_NAMES = ("square", "disc", "triangle", "cross", "ring", "diamond")

_MAX_OCCLUSION = 0.5
_PLACEMENT_TRIES = 25
_MIN_CONTRAST = 90.0


def _shape_mask(name: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """Boolean ``[h, w]`` mask of shape ``name`` stretched over an ``h x w`` box."""
  u = (np.arange(w, dtype=np.float32) + 0.5) / w * 2.0 - 1.0
  v = (np.arange(h, dtype=np.float32) + 0.5) / h * 2.0 - 1.0
  uu, vv = u[None, :], v[:, None]
  if name == "square":
    return np.ones((h, w), bool)
  if name == "disc":
    return uu**2 + vv**2 <= 1.0
  if name == "triangle":
    direction = rng.integers(4)
    a, b = (uu, vv) if direction < 2 else (vv, uu)
    b = b if direction % 2 == 0 else -b
    return np.abs(a) <= (b + 1.0) * 0.5
  if name == "cross":
    t = rng.uniform(0.25, 0.4)
    return (np.abs(uu) <= t) | (np.abs(vv) <= t)
  if name == "ring":
    r2 = uu**2 + vv**2
    return (r2 <= 1.0) & (r2 >= rng.uniform(0.4, 0.65) ** 2)
  if name == "diamond":
    return np.abs(uu) + np.abs(vv) <= 1.0
  raise ValueError(f"unknown shape {name!r}; known: {SHAPE_NAMES}")


def _upsample(coarse: np.ndarray, h: int, w: int) -> np.ndarray:
  """Bilinear upsampling of ``[gh, gw, c]`` to ``[h, w, c]``."""
  gh, gw = coarse.shape[:2]
  ys = np.linspace(0.0, gh - 1.0, h, dtype=np.float32)
  xs = np.linspace(0.0, gw - 1.0, w, dtype=np.float32)
  y0 = np.minimum(ys.astype(np.int32), gh - 2)
  x0 = np.minimum(xs.astype(np.int32), gw - 2)
  fy = (ys - y0)[:, None, None]
  fx = (xs - x0)[None, :, None]
  top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
  bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """Float32 ``[h, w, 3]`` textured background in 0-255."""
  base = rng.uniform(30.0, 225.0, 3).astype(np.float32)
  kind = rng.integers(3)
  if kind == 0:
    g = int(rng.integers(3, 9))
    coarse = rng.normal(0.0, 1.0, (g, g, 3)).astype(np.float32)
    img = base + rng.uniform(10.0, 35.0) * _upsample(coarse, h, w)
  else:
    angle = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx + np.sin(angle) * yy) / max(h, w)
    if kind == 1:
      delta = rng.uniform(-70.0, 70.0, 3).astype(np.float32)
      img = base + (t - 0.5)[..., None] * delta
    else:
      period = rng.uniform(0.05, 0.25)
      amp = rng.uniform(10.0, 30.0)
      img = base + amp * np.sin(2 * np.pi * t / period)[..., None] * np.ones(3, np.float32)
  return img.astype(np.float32)


def _overlap_ok(box: np.ndarray, placed: list[np.ndarray], max_iou: float) -> bool:
  if not placed:
    return True
  p = np.stack(placed)
  iw = np.clip(np.minimum(p[:, 2], box[2]) - np.maximum(p[:, 0], box[0]), 0, None)
  ih = np.clip(np.minimum(p[:, 3], box[3]) - np.maximum(p[:, 1], box[1]), 0, None)
  inter = iw * ih
  area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
  area_b = (box[2] - box[0]) * (box[3] - box[1])
  iou = inter / (area_p + area_b - inter)
  return bool(np.all(iou <= max_iou) and np.all(inter <= _MAX_OCCLUSION * area_p))


def _pick_colour(region_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  candidates = rng.uniform(0.0, 255.0, (8, 3)).astype(np.float32)
  dist = np.linalg.norm(candidates - region_mean, axis=-1)
  best = candidates[np.argmax(dist)]
  if dist.max() < _MIN_CONTRAST:
    best = np.where(region_mean > 127.5, 0.0, 255.0).astype(np.float32)
  return best


def draw_synthetic_image(
  rng: np.random.Generator,
  *,
  height: int,
  width: int,
  num_classes: int,
  max_objects: int,
  min_size: int,
  max_size: int,
  max_iou: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """One image: ``(image uint8 [H,W,3], boxes float32 [n,4] xyxy, labels int32 [n],
  areas float32 [n])`` with areas the shapes' pixel counts."""
  canvas = _background(height, width, rng)
  n = int(rng.integers(1, max_objects + 1))
  sizes = np.exp(rng.uniform(np.log(min_size), np.log(max_size), n))
  aspect = np.exp(rng.uniform(np.log(0.6), np.log(1.6), n))
  ws = np.clip(np.round(sizes * np.sqrt(aspect)), min_size, min(max_size, width)).astype(int)
  hs = np.clip(np.round(sizes / np.sqrt(aspect)), min_size, min(max_size, height)).astype(int)
  labels = rng.integers(0, num_classes, n)
  order = np.argsort(-(ws * hs), kind="stable")
  placed: list[np.ndarray] = []
  boxes, out_labels, areas = [], [], []
  for i in order:
    w, h = int(ws[i]), int(hs[i])
    for _ in range(_PLACEMENT_TRIES):
      x0 = int(rng.integers(0, width - w + 1))
      y0 = int(rng.integers(0, height - h + 1))
      box = np.array([x0, y0, x0 + w, y0 + h], np.float32)
      if _overlap_ok(box, placed, max_iou):
        break
    else:
      continue
    mask = _shape_mask(SHAPE_NAMES[labels[i]], h, w, rng)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
      continue
    region = canvas[y0 : y0 + h, x0 : x0 + w]
    colour = _pick_colour(region[mask].mean(0), rng)
    region[mask] = colour
    placed.append(box)
    boxes.append([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1])
    out_labels.append(labels[i])
    areas.append(mask.sum())
  canvas += rng.normal(0.0, rng.uniform(2.0, 8.0), canvas.shape).astype(np.float32)
  image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
  return (
    image,
    np.asarray(boxes, np.float32).reshape(-1, 4),
    np.asarray(out_labels, np.int32),
    np.asarray(areas, np.float32),
  )


def make_synthetic_dataset(
  num_images: int,
  *,
  image_size: int | tuple[int, int] = 128,
  num_classes: int = 3,
  max_objects: int = 6,
  min_size: int = 8,
  max_size: int | None = None,
  max_iou: float = 0.5,
  seed: int | Sequence[int] = 0,
) -> DetectionDataset:
  """``num_images`` synthetic shape images (``image_size`` is ``S`` or ``(H, W)``).

  Image ``i`` depends only on ``(seed, i)``, so a longer dataset extends a shorter one.
  Classes are the first ``num_classes`` of :data:`SHAPE_NAMES`; object sizes are
  log-uniform in ``[min_size, max_size]`` (default three quarters of the short side).
  """
  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  if not 1 <= num_classes <= len(SHAPE_NAMES):
    raise ValueError(f"num_classes must be in [1, {len(SHAPE_NAMES)}], got {num_classes}")
  if max_size is None:
    max_size = int(0.75 * min(height, width))
  if not 1 <= min_size <= max_size <= min(height, width):
    raise ValueError(
      f"need 1 <= min_size ({min_size}) <= max_size ({max_size}) <= image side "
      f"({min(height, width)})"
    )
  if max_objects < 1:
    raise ValueError(f"max_objects must be >= 1, got {max_objects}")
  seed_key = [int(seed)] if np.ndim(seed) == 0 else [int(s) for s in seed]
  records, images, annotations = [], [], []
  for i in range(num_images):
    rng = np.random.default_rng(
      np.random.SeedSequence([len(seed_key), *seed_key], spawn_key=(i,))
    )
    image, boxes, labels, areas = draw_synthetic_image(
      rng,
      height=height,
      width=width,
      num_classes=num_classes,
      max_objects=max_objects,
      min_size=min_size,
      max_size=max_size,
      max_iou=max_iou,
    )
    image.setflags(write=False)
    image_id = i + 1
    records.append(Record(image_id, width, height, boxes, labels, image))
    images.append(
      {"id": image_id, "file_name": f"synthetic_{i:06d}.png", "width": width, "height": height}
    )
    for box, label, area in zip(boxes.tolist(), labels.tolist(), areas.tolist()):
      annotations.append(
        {
          "id": len(annotations) + 1,
          "image_id": image_id,
          "category_id": label + 1,
          "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
          "area": area,
          "iscrowd": 0,
        }
      )
  names = SHAPE_NAMES[:num_classes]
  coco = {
    "info": {"description": f"jaxrank synthetic shapes (seed {seed_key})"},
    "images": images,
    "annotations": annotations,
    "categories": [
      {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(names)
    ],
  }
  return DetectionDataset(
    records,
    coco,
    label_to_category_id={k: k + 1 for k in range(num_classes)},
    class_names=names,
  )


def synthetic_splits(
  seed: int, num_train: int, num_val: int, **kwargs
) -> tuple[DetectionDataset, DetectionDataset]:
  """Train and validation synthetic datasets drawn from disjoint seed streams.

  ``kwargs`` go to :func:`make_synthetic_dataset`.
  """
  train = make_synthetic_dataset(num_train, seed=(int(seed), 0), **kwargs)
  val = make_synthetic_dataset(num_val, seed=(int(seed), 1), **kwargs)
  return train, val
