import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from jaxrank import ops


def _random_boxes(rng, n, size=100.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(1, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _np_giou(b1, b2):
  lt = np.maximum(b1[:, None, :2], b2[None, :, :2])
  rb = np.minimum(b1[:, None, 2:], b2[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  a1 = np.prod(b1[:, 2:] - b1[:, :2], axis=1)
  a2 = np.prod(b2[:, 2:] - b2[:, :2], axis=1)
  union = a1[:, None] + a2[None, :] - inter
  elt = np.minimum(b1[:, None, :2], b2[None, :, :2])
  erb = np.maximum(b1[:, None, 2:], b2[None, :, 2:])
  enc = np.prod(erb - elt, axis=-1)
  return inter / union - (enc - union) / enc


def test_pairwise_iou_matches_pycocotools():
  rng = np.random.default_rng(0)
  b1, b2 = _random_boxes(rng, 20), _random_boxes(rng, 15)
  xywh = lambda b: np.asarray(ops.box_xyxy_to_xywh(b), np.float64)
  expected = mask_utils.iou(xywh(b1), xywh(b2), np.zeros(15, np.uint8))
  np.testing.assert_allclose(ops.pairwise_iou(b1, b2), expected, atol=1e-5)
  np.testing.assert_allclose(ops.aligned_iou(b1[:15], b2), np.diag(expected[:15]), atol=1e-5)


def test_giou_matches_numpy():
  rng = np.random.default_rng(1)
  b1, b2 = _random_boxes(rng, 12), _random_boxes(rng, 9)
  np.testing.assert_allclose(ops.pairwise_giou(b1, b2), _np_giou(b1, b2), atol=1e-5)
  iou, giou = jax.jit(ops.aligned_iou_giou)(b1[:9], b2)
  np.testing.assert_allclose(giou, np.diag(_np_giou(b1[:9], b2)), atol=1e-5)
  assert np.all(giou <= iou + 1e-6)


def test_giou_limits():
  box = np.array([[0.0, 0.0, 10.0, 10.0]], np.float32)
  np.testing.assert_allclose(ops.aligned_giou(box, box), [1.0], atol=1e-6)
  far = np.array([[1e4, 1e4, 1e4 + 10.0, 1e4 + 10.0]], np.float32)
  giou = float(ops.aligned_giou(box, far)[0])
  assert -1.0 <= giou < -0.999
  assert float(ops.aligned_iou(box, far)[0]) == 0.0


def test_format_conversions_round_trip():
  b = _random_boxes(np.random.default_rng(2), 7)
  np.testing.assert_allclose(ops.box_cxcywh_to_xyxy(ops.box_xyxy_to_cxcywh(b)), b, atol=1e-4)
  np.testing.assert_allclose(ops.box_xywh_to_xyxy(ops.box_xyxy_to_xywh(b)), b, atol=1e-4)
  cxcywh = ops.box_xyxy_to_cxcywh(np.array([0.0, 2.0, 4.0, 10.0]))
  np.testing.assert_allclose(cxcywh, [2.0, 6.0, 4.0, 8.0])
  np.testing.assert_allclose(ops.box_area(b), np.prod(b[:, 2:] - b[:, :2], 1), rtol=1e-5)


def test_clip_and_valid():
  b = jnp.array([[-5.0, -5.0, 50.0, 30.0], [10.0, 10.0, 10.0, 20.0]])
  np.testing.assert_allclose(ops.clip_boxes(b, (20, 40)), [[0, 0, 40, 20], [10, 10, 10, 20]])
  per_image = ops.clip_boxes(jnp.stack([b, b]), jnp.array([[20, 40], [100, 100]]))
  np.testing.assert_allclose(per_image[1], [[0, 0, 50, 30], [10, 10, 10, 20]])
  np.testing.assert_array_equal(ops.valid_boxes(b), [True, False])


def test_wrong_shape_raises():
  with pytest.raises(ValueError, match="4"):
    ops.pairwise_iou(np.zeros((3, 5)), np.zeros((2, 4)))
  with pytest.raises(ValueError):
    ops.box_area(np.zeros((3, 3)))
