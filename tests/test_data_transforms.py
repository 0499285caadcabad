"""Tests of the host-side image transforms and the inference-time image preparation."""

import numpy as np
import pytest

from jaxrank.data import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  normalize_images,
  prepare_example,
  prepare_image_for_inference,
  transforms,
)


def _box_in_frame(prepared):
  """xyxy extent of the pixels brighter than half scale in a prepared image."""
  pixels = prepared * IMAGENET_STD + IMAGENET_MEAN
  ys, xs = np.nonzero(pixels.mean(-1) > 127.5)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_box_maps_back_to_original_pixels():
  image = np.zeros((180, 300, 3), np.uint8)  # H x W, non-square
  box = np.array([60, 30, 180, 120], np.float32)
  image[30:120, 60:180] = 255
  prepared, scale = prepare_image_for_inference(image, 100)
  assert prepared.shape == (100, 100, 3) and prepared.dtype == np.float32
  assert scale == pytest.approx(1 / 3)
  np.testing.assert_array_equal(prepared[60:], 0.0)  # bottom padding
  np.testing.assert_allclose(_box_in_frame(prepared) / scale, box, atol=1.0)


def test_same_as_evaluation_pipeline():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (173, 251, 3), dtype=np.uint8)
  box = np.array([[17.0, 40.0, 203.0, 160.0]], np.float32)
  prepared, scale = prepare_image_for_inference(image, 64)
  example, _ = prepare_example({"image": image, "boxes": box, "labels": [0], "image_id": 1},
                               image_size=64, max_boxes=2)
  batch_image = normalize_images(example["image"][None], example["image_hw"][None])[0]
  np.testing.assert_allclose(prepared, np.asarray(batch_image), rtol=1e-6, atol=1e-6)
  assert np.float32(scale) == example["scale"]
  np.testing.assert_allclose(example["boxes"][0] / scale, box[0], atol=1e-3)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)])
def test_rejects_bad_images(bad):
  with pytest.raises(ValueError, match="image"):
    prepare_image_for_inference(bad, 32)
  with pytest.raises(ValueError, match="image_size"):
    prepare_image_for_inference(np.zeros((8, 8, 3), np.uint8), 0)


def _random_example(rs, max_side=160):
  h, w = (int(v) for v in rs.integers(8, max_side, 2))
  n = int(rs.integers(0, 5))
  xy = rs.uniform(0, 1, (n, 2)) * [w, h]
  boxes = np.concatenate([xy, xy + rs.uniform(2, max_side / 2, (n, 2))], 1).astype(np.float32)
  return rs.integers(0, 256, (h, w, 3), dtype=np.uint8), boxes, rs.integers(0, 3, n)


def _augment_step_by_step(image, boxes, labels, rng, mode):
  """The augmentation recipe from the public steps, each building its whole output (SSD's
  full expanded canvas, then its crop)."""
  if mode == "none":
    return image, boxes, labels
  if mode == "ssd":
    image = transforms.photometric_distort(image, rng)
    image, boxes = transforms.random_expand(image, boxes, rng)
    image, boxes, labels = transforms.min_iou_random_crop(image, boxes, labels, rng)
  image, boxes = transforms.random_flip(image, boxes, rng)
  return image, boxes, labels


@pytest.mark.parametrize("mode,image_size", [("ssd", 96), ("ssd", 300), ("flip", 64),
                                             ("flip", 211), ("none", 50)])
def test_augment_to_fit_is_augment_then_resize(mode, image_size):
  """augment == its steps one by one; augment_to_fit == augment then resize_to_fit."""
  rs = np.random.default_rng(image_size)
  shapes = set()
  for seed in range(40):
    image, boxes, labels = _random_example(rs)
    if seed == 0:  # the long side already fits: no resize
      image = rs.integers(0, 256, (image_size // 2, image_size, 3), dtype=np.uint8)
    before = image.copy()
    aug_image, aug_boxes, aug_labels = transforms.augment(
      image, boxes, labels, np.random.default_rng(seed), mode)
    step_image, step_boxes, step_labels = _augment_step_by_step(
      image, boxes, labels, np.random.default_rng(seed), mode)
    np.testing.assert_array_equal(aug_image, step_image)
    np.testing.assert_array_equal(aug_boxes, step_boxes)
    np.testing.assert_array_equal(aug_labels, step_labels)
    want_image, want_boxes, want_scale = transforms.resize_to_fit(aug_image, aug_boxes,
                                                                  image_size)
    got_image, got_boxes, got_labels, got_scale = transforms.augment_to_fit(
      image, boxes, labels, np.random.default_rng(seed), mode, image_size)
    np.testing.assert_array_equal(got_image, want_image)
    np.testing.assert_array_equal(got_boxes, want_boxes)
    np.testing.assert_array_equal(got_labels, aug_labels)
    assert got_scale == want_scale and got_boxes.dtype == np.float32
    np.testing.assert_array_equal(image, before)
    shapes.add(aug_image.shape[:2] == image.shape[:2])
  if mode == "ssd":
    assert shapes == {True, False}  # some draws expanded or cropped


def test_random_expand_canvas():
  rs = np.random.default_rng(1)
  marker = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)  # its shift is the image's place
  expanded = 0
  for seed in range(20):
    image = rs.integers(0, 256, tuple(rs.integers(8, 60, 2)) + (3,), dtype=np.uint8)
    canvas, moved = transforms.random_expand(image, marker, np.random.default_rng(seed))
    if canvas is image:
      continue
    expanded += 1
    left, top = (int(v) for v in moved[0, :2])
    want = np.full_like(canvas, 0) + np.round(transforms.IMAGENET_MEAN).astype(np.uint8)
    want[top:top + image.shape[0], left:left + image.shape[1]] = image
    np.testing.assert_array_equal(canvas, want)
  assert expanded >= 5
