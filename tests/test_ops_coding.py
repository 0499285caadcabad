import math

import jax
import numpy as np
import pytest

from jaxrank import ops


def _boxes(rng, n):
  xy = rng.uniform(0, 200, (n, 2))
  wh = rng.uniform(4, 100, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_round_trip():
  rng = np.random.default_rng(0)
  anchors, gts = _boxes(rng, 50), _boxes(rng, 50)
  deltas = jax.jit(ops.encode_boxes)(anchors, gts)
  np.testing.assert_allclose(ops.decode_boxes(anchors, deltas), gts, atol=1e-3)
  means, stds = (0.1, -0.2, 0.0, 0.3), (1.0, 1.0, 0.5, 0.5)
  deltas = ops.encode_boxes(anchors, gts, means=means, stds=stds)
  np.testing.assert_allclose(ops.decode_boxes(anchors, deltas, means=means, stds=stds), gts,
                             atol=1e-3)


def test_known_values():
  anchor = np.array([0.0, 0.0, 10.0, 20.0])
  gt = np.array([5.0, 0.0, 25.0, 20.0])
  d = ops.encode_boxes(anchor, gt)
  np.testing.assert_allclose(d, [1.0 / 0.1, 0.0, math.log(2.0) / 0.2, 0.0], rtol=1e-5)


def test_clamping_and_clipping():
  anchor = np.array([[0.0, 0.0, 10.0, 10.0]])
  big = np.array([[0.0, 0.0, 100.0, -100.0]])
  out = ops.decode_boxes(anchor, big)
  ratio = abs(math.log(16 / 1000))
  w = 10 * math.exp(ratio)
  np.testing.assert_allclose(out[0, 2] - out[0, 0], w, rtol=1e-4)
  np.testing.assert_allclose(out[0, 3] - out[0, 1], 10 * math.exp(-ratio), rtol=1e-4)
  clipped = ops.decode_boxes(anchor, big, clip_to=(8, 30))
  np.testing.assert_allclose(clipped[0], [0.0, 5 - 10 * math.exp(-ratio) / 2 + 0.0, 30.0,
                                          5 + 10 * math.exp(-ratio) / 2], rtol=1e-4)
  clipped = ops.decode_boxes(anchor, np.zeros((1, 4)), clip_to=(8, 30))
  np.testing.assert_allclose(clipped[0], [0, 0, 10, 8])


def test_zero_target_is_finite_and_bad_shape_raises():
  d = ops.encode_boxes(np.array([[0.0, 0.0, 10.0, 10.0]]), np.zeros((1, 4)))
  assert np.all(np.isfinite(d))
  with pytest.raises(ValueError):
    ops.encode_boxes(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="stds"):
    ops.decode_boxes(np.zeros((2, 4)), np.zeros((2, 4)), stds=(1.0, 1.0))
