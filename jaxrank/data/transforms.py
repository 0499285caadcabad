"""Host-side (numpy + PIL) image and box transforms.

Images are ``uint8 [H, W, 3]`` (batches keep them ``uint8``; :func:`normalize_images` makes
the detectors' float input on the device); boxes are float32
``[n, 4]`` ``(x1, y1, x2, y2)`` in pixels. Every random transform takes a
``numpy.random.Generator`` and never modifies its inputs in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], np.float32)


def box_areas(boxes: np.ndarray) -> np.ndarray:
  wh = np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None)
  return wh[:, 0] * wh[:, 1]


def clip_and_filter(
  boxes: np.ndarray, labels: np.ndarray, height: float, width: float, min_size: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
  """Clips boxes to ``[0, width] x [0, height]`` and drops those not wider and taller
  than ``min_size``."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  boxes = np.clip(boxes, 0.0, np.array([width, height, width, height], np.float32))
  wh = boxes[:, 2:] - boxes[:, :2]
  keep = (wh[:, 0] > min_size) & (wh[:, 1] > min_size)
  return boxes[keep], np.asarray(labels)[keep]


def fit_size(height: int, width: int, image_size: int) -> tuple[int, int, float]:
  """``(new_height, new_width, scale)``: the size that fits ``image_size x image_size``
  keeping the aspect ratio (long side ``image_size``), and ``new / old``."""
  scale = image_size / max(height, width)
  new_h = min(image_size, max(1, round(height * scale)))
  new_w = min(image_size, max(1, round(width * scale)))
  return new_h, new_w, scale


def resized_pixels(image: np.ndarray, height: int, width: int, *, flip: bool = False) -> np.ndarray:
  """``image`` (any strides), mirrored left-right if ``flip``, resized bilinearly to
  ``height x width``: PIL does the mirroring and the resizing (no strided numpy copies)."""
  from PIL import Image

  if (height, width) == image.shape[:2]:
    return image[:, ::-1] if flip else image
  pil = Image.fromarray(np.ascontiguousarray(image))
  if flip:
    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR), np.uint8)


def resize_to_fit(
  image: np.ndarray, boxes: np.ndarray, image_size: int
) -> tuple[np.ndarray, np.ndarray, float]:
  """Resizes keeping the aspect ratio so the long side is ``image_size``.

  Returns ``(image, boxes, scale)`` with ``resized = original * scale``.
  """
  new_h, new_w, scale = fit_size(*image.shape[:2], image_size)
  image = resized_pixels(image, new_h, new_w)
  return image, np.asarray(boxes, np.float32) * np.float32(scale), float(scale)


def pad_image(image: np.ndarray, image_size: int) -> np.ndarray:
  """``uint8 [S, S, 3]``: ``image`` at the top left, zeros in the bottom/right padding."""
  h, w = image.shape[:2]
  if h > image_size or w > image_size:
    raise ValueError(f"image {h}x{w} is larger than image_size {image_size}")
  out = np.zeros((image_size, image_size, 3), np.uint8)
  out[:h, :w] = image
  return out


def pad_and_normalize(image: np.ndarray, image_size: int) -> np.ndarray:
  """Float32 ``[S, S, 3]``: ``(image - mean) / std`` at the top left, zeros (the mean
  colour) in the bottom/right padding."""
  h, w = image.shape[:2]
  if h > image_size or w > image_size:
    raise ValueError(f"image {h}x{w} is larger than image_size {image_size}")
  out = np.zeros((image_size, image_size, 3), np.float32)
  out[:h, :w] = (image.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
  return out


def normalize_images(images, image_hw):
  """What the detectors take from a batch's ``uint8`` images: float32 ``[B, S, S, 3]``
  ``(image - mean) / std`` inside each image's ``image_hw`` ``[B, 2]`` (height, width), zeros
  (the mean colour) in the padding, as :func:`pad_and_normalize` gives one image.

  ``jax.numpy``, for use inside a jitted step (the batches cross from the loader processes and
  to the devices as ``uint8``, a quarter of the bytes). Float images are taken as already
  normalised and returned as they are.
  """
  import jax.numpy as jnp

  images = jnp.asarray(images)
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  if images.dtype != jnp.uint8:
    raise TypeError(f"batch images must be uint8 pixels or normalised floats, got {images.dtype}")
  size_h, size_w = images.shape[1:3]
  hw = jnp.asarray(image_hw, jnp.int32)
  inside = ((jnp.arange(size_h) < hw[:, :1])[:, :, None]
            & (jnp.arange(size_w) < hw[:, 1:])[:, None, :])
  normalized = (images.astype(jnp.float32) - IMAGENET_MEAN) / IMAGENET_STD
  return jnp.where(inside[..., None], normalized, 0.0)


def prepare_image_for_inference(image: np.ndarray, image_size: int) -> tuple[np.ndarray, float]:
  """An image as the evaluation batches hold it, and its ``scale``.

  Applies :func:`resize_to_fit` then :func:`pad_and_normalize`, as
  :func:`jaxrank.data.prepare_example` does without augmentation. Returns float32
  ``[S, S, 3]`` and ``scale``; a box predicted in the ``S x S`` frame maps back to the
  original image's pixels as ``box / scale``.

  Args:
    image: ``uint8 [H, W, 3]`` RGB.
    image_size: ``S``.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(
      f"image must be uint8 [H, W, 3] RGB, got {image.dtype} with shape {image.shape}"
    )
  if min(image.shape[:2]) < 1:
    raise ValueError(f"image must not be empty, got shape {image.shape}")
  if int(image_size) < 1:
    raise ValueError(f"image_size must be >= 1, got {image_size}")
  resized, _, scale = resize_to_fit(image, np.zeros((0, 4), np.float32), int(image_size))
  return pad_and_normalize(resized, int(image_size)), scale


def hflip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
  """Boxes of an image ``width`` pixels wide, mirrored left-right."""
  boxes = np.asarray(boxes, np.float32)
  flipped = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=-1)
  return flipped.reshape(-1, 4)


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mirrors the image and its boxes left-right."""
  return image[:, ::-1], hflip_boxes(boxes, image.shape[1])


def random_flip(
  image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
  """:func:`hflip` with probability ``prob``."""
  if rng.random() < prob:
    return hflip(image, boxes)
  return image, boxes


def photometric_distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """SSD-style random brightness, contrast and saturation, each applied with
  probability 1/2."""
  img = image.astype(np.float32)
  if rng.random() < 0.5:
    img += rng.uniform(-32.0, 32.0)
  if rng.random() < 0.5:
    img *= rng.uniform(0.5, 1.5)
  if rng.random() < 0.5:
    gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
    img = gray[..., None] + (img - gray[..., None]) * rng.uniform(0.5, 1.5)
  if rng.random() < 0.5:
    img = img[..., rng.permutation(3)]
  np.round(img, out=img)
  return np.clip(img, 0, 255, out=img).astype(np.uint8)


def expand_placement(
  height: int, width: int, rng: np.random.Generator, *, max_ratio: float = 4.0,
  prob: float = 0.5,
) -> tuple[int, int, int, int] | None:
  """The random draws of :func:`random_expand` for a ``height x width`` image:
  ``(canvas_height, canvas_width, top, left)``, or None (no expansion)."""
  if rng.random() >= prob:
    return None
  ratio = rng.uniform(1.0, max_ratio)
  eh, ew = int(height * ratio), int(width * ratio)
  top, left = int(rng.integers(0, eh - height + 1)), int(rng.integers(0, ew - width + 1))
  return eh, ew, top, left


def canvas_region(
  image: np.ndarray, top: int, left: int, region: tuple[int, int, int, int]
) -> np.ndarray:
  """Pixels ``region = (x1, y1, x2, y2)`` of a canvas filled with the mean colour with
  ``image`` at ``(top, left)``, built without the rest of the canvas (a view of ``image``
  when the region lies inside it)."""
  x1, y1, x2, y2 = region
  h, w = image.shape[:2]
  if top <= y1 and left <= x1 and y2 <= top + h and x2 <= left + w:
    return image[y1 - top : y2 - top, x1 - left : x2 - left]
  out = np.empty((y2 - y1, x2 - x1, 3), np.uint8)
  if out.size:
    out[0] = np.round(IMAGENET_MEAN).astype(np.uint8)
    out[1:] = out[0]  # row by row: much faster than broadcasting the 3 channels
  iy1, iy2 = max(y1, top), min(y2, top + h)
  ix1, ix2 = max(x1, left), min(x2, left + w)
  if iy1 < iy2 and ix1 < ix2:
    out[iy1 - y1 : iy2 - y1, ix1 - x1 : ix2 - x1] = image[iy1 - top : iy2 - top,
                                                          ix1 - left : ix2 - left]
  return out


def random_expand(
  image: np.ndarray,
  boxes: np.ndarray,
  rng: np.random.Generator,
  *,
  max_ratio: float = 4.0,
  prob: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
  """With probability ``prob``, places the image at a random spot of a canvas up to
  ``max_ratio`` times larger, filled with the mean colour (SSD's zoom out)."""
  placement = expand_placement(*image.shape[:2], rng, max_ratio=max_ratio, prob=prob)
  if placement is None:
    return image, boxes
  eh, ew, top, left = placement
  canvas = canvas_region(image, top, left, (0, 0, ew, eh))
  offset = np.array([left, top, left, top], np.float32)
  return canvas, np.asarray(boxes, np.float32) + offset


def _iou_with(patch: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  lt = np.maximum(boxes[:, :2], patch[:2])
  rb = np.minimum(boxes[:, 2:], patch[2:])
  wh = np.clip(rb - lt, 0.0, None)
  inter = wh[:, 0] * wh[:, 1]
  union = box_areas(boxes) + (patch[2] - patch[0]) * (patch[3] - patch[1]) - inter
  return inter / np.maximum(union, 1e-6)


def crop_placement(
  height: int,
  width: int,
  boxes: np.ndarray,
  labels: np.ndarray,
  rng: np.random.Generator,
  *,
  min_ious: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
  min_crop_size: float = 0.3,
  max_tries: int = 50,
) -> tuple[tuple[int, int, int, int] | None, np.ndarray, np.ndarray]:
  """The random draws of :func:`min_iou_random_crop` for a ``height x width`` image:
  ``(patch, boxes, labels)``, the patch ``(x1, y1, x2, y2)`` (None: no crop) and the boxes
  kept, in the patch's pixels."""
  mode = rng.integers(len(min_ious) + 1)
  if mode == len(min_ious):
    return None, boxes, labels
  min_iou = min_ious[mode]
  h, w = height, width
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  for _ in range(max_tries):
    cw = rng.uniform(min_crop_size * w, w)
    ch = rng.uniform(min_crop_size * h, h)
    if not 0.5 <= ch / cw <= 2.0:
      continue
    left, top = rng.uniform(0.0, w - cw), rng.uniform(0.0, h - ch)
    patch = np.array([left, top, left + cw, top + ch], np.float32).round()
    if patch[2] - patch[0] < 1 or patch[3] - patch[1] < 1:
      continue
    if len(boxes) and _iou_with(patch, boxes).min() < min_iou:
      continue
    centres = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    inside = np.all((centres > patch[:2]) & (centres < patch[2:]), axis=1)
    if len(boxes) and not inside.any():
      continue
    x1, y1, x2, y2 = (int(v) for v in patch)
    shifted = boxes[inside] - np.array([x1, y1, x1, y1], np.float32)
    kept_boxes, kept_labels = clip_and_filter(shifted, labels[inside], y2 - y1, x2 - x1)
    return (x1, y1, x2, y2), kept_boxes, kept_labels
  return None, boxes, labels


def min_iou_random_crop(
  image: np.ndarray,
  boxes: np.ndarray,
  labels: np.ndarray,
  rng: np.random.Generator,
  *,
  min_ious: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
  min_crop_size: float = 0.3,
  max_tries: int = 50,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """SSD's random crop: a patch whose IoU with every box is at least a random choice of
  ``min_ious`` (or no crop), keeping the boxes whose centres fall inside it."""
  patch, boxes, labels = crop_placement(
    *image.shape[:2], boxes, labels, rng, min_ious=min_ious, min_crop_size=min_crop_size,
    max_tries=max_tries)
  if patch is None:
    return image, boxes, labels
  x1, y1, x2, y2 = patch
  return image[y1:y2, x1:x2], boxes, labels


AUGMENTATIONS = ("none", "flip", "ssd")


def _augment_geometry(
  image: np.ndarray,
  boxes: np.ndarray,
  labels: np.ndarray,
  rng: np.random.Generator,
  mode: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
  """The random draws of augmentation ``mode`` applied to all but the pixels' flip:
  ``(image, boxes, labels, flip)`` with the boxes already mirrored when ``flip``. SSD's
  expanded canvas is never built, only the crop of it (:func:`canvas_region`)."""
  if mode not in AUGMENTATIONS:
    raise ValueError(f"unknown augmentation {mode!r}; expected one of {AUGMENTATIONS}")
  if mode == "none":
    return image, boxes, labels, False
  if mode == "ssd":
    image = photometric_distort(image, rng)
    height, width = image.shape[:2]
    top = left = 0
    placement = expand_placement(height, width, rng)
    if placement is not None:
      height, width, top, left = placement
      boxes = np.asarray(boxes, np.float32) + np.array([left, top, left, top], np.float32)
    patch, boxes, labels = crop_placement(height, width, boxes, labels, rng)
    image = canvas_region(image, top, left, patch or (0, 0, width, height))
  flip = bool(rng.random() < 0.5)
  if flip:
    boxes = hflip_boxes(boxes, image.shape[1])
  return image, boxes, labels, flip


def augment(
  image: np.ndarray,
  boxes: np.ndarray,
  labels: np.ndarray,
  rng: np.random.Generator,
  mode: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Applies augmentation ``mode``: ``"none"``, ``"flip"`` (random horizontal flip) or
  ``"ssd"`` (photometric distortion, expand, min-IoU crop, then flip): the random draws and
  results of :func:`photometric_distort`, :func:`random_expand`,
  :func:`min_iou_random_crop` and :func:`random_flip` in turn."""
  image, boxes, labels, flip = _augment_geometry(image, boxes, labels, rng, mode)
  return (image[:, ::-1] if flip else image), boxes, labels


def augment_to_fit(
  image: np.ndarray,
  boxes: np.ndarray,
  labels: np.ndarray,
  rng: np.random.Generator,
  mode: str,
  image_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
  """:func:`augment` then :func:`resize_to_fit`, with the same random draws and the same
  pixels, boxes and labels, but cheaper: the flip is done by PIL on the way to the resize.

  Returns ``(image, boxes, labels, scale)``; ``image`` may be a view of the input.
  """
  image, boxes, labels, flip = _augment_geometry(image, boxes, labels, rng, mode)
  new_h, new_w, scale = fit_size(*image.shape[:2], image_size)
  image = resized_pixels(image, new_h, new_w, flip=flip)
  return image, np.asarray(boxes, np.float32) * np.float32(scale), labels, float(scale)
