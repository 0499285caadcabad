"""Tests of the inference-time image preparation."""

import numpy as np
import pytest

from jaxrank.data import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  normalize_images,
  prepare_example,
  prepare_image_for_inference,
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
