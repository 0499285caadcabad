import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank.ops.roi_align import multilevel_roi_align, roi_align, roi_levels

# ----------------------------------------------------------------------------------------
# Float64 loop-style reference, straight from torchvision's CPU roi_align kernel.


def _np_bilinear(height, width, y, x):
  """Neighbours ``(row, col, weight)`` of one sample; empty outside ``[-1, H] x [-1, W]``."""
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return []
  y = max(y, 0.0)
  x = max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_high = y_low = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_high = x_low = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx),
          (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]


def _np_contributions(height, width, box, output_size, scale, sampling_ratio, aligned):
  """Yields ``(ph, pw, row, col, weight)`` with the 1 / count of the bin mean folded in."""
  out_h, out_w = output_size
  offset = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = (float(v) * scale - offset for v in box)
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:
    roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
  bin_h, bin_w = roi_h / out_h, roi_w / out_w
  count = max(sampling_ratio * sampling_ratio, 1)
  for ph in range(out_h):
    for pw in range(out_w):
      for iy in range(sampling_ratio):
        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio
        for ix in range(sampling_ratio):
          x = x1 + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio
          for row, col, w in _np_bilinear(height, width, y, x):
            yield ph, pw, row, col, w / count


def np_roi_align(features, boxes, output_size, scale, sampling_ratio, aligned):
  features = np.asarray(features, np.float64)
  height, width, channels = features.shape
  out = np.zeros((len(boxes), *output_size, channels))
  for r, box in enumerate(boxes):
    for ph, pw, row, col, w in _np_contributions(height, width, box, output_size, scale,
                                                 sampling_ratio, aligned):
      out[r, ph, pw] += w * features[row, col]
  return out


def np_roi_align_adjoint(shape, boxes, cotangent, output_size, scale, sampling_ratio, aligned):
  """Gradient of ``sum(roi_align(features) * cotangent)`` w.r.t. the features."""
  height, width, _ = shape
  grad = np.zeros(shape)
  for r, box in enumerate(boxes):
    for ph, pw, row, col, w in _np_contributions(height, width, box, output_size, scale,
                                                 sampling_ratio, aligned):
      grad[row, col] += w * cotangent[r, ph, pw]
  return grad


# ----------------------------------------------------------------------------------------

HEIGHT, WIDTH, CHANNELS = 13, 17, 3


def _boxes(rng, image_h, image_w):
  """Random boxes inside, partly and fully outside, tiny, zero-size and inverted."""
  def rand_boxes(n, lo, hi):
    xy = rng.uniform(lo, hi, (n, 2)) * [image_w, image_h]
    wh = rng.uniform(0.05, 0.7, (n, 2)) * [image_w, image_h]
    return np.concatenate([xy, xy + wh], axis=1)

  inside = rand_boxes(5, 0.0, 0.5)
  partly = rand_boxes(4, -0.3, 0.9)
  partly[0] = [-0.2 * image_w, -0.1 * image_h, 1.2 * image_w, 1.1 * image_h]
  outside = np.array([
      [1.3 * image_w, 0.2 * image_h, 1.6 * image_w, 0.6 * image_h],
      [0.1 * image_w, -0.9 * image_h, 0.5 * image_w, -0.4 * image_h],
  ])
  xy = rng.uniform(0.0, 1.0, (3, 2)) * [image_w, image_h]
  tiny = np.concatenate([xy, xy + rng.uniform(0.1, 0.9, (3, 2))], axis=1)
  xy = rng.uniform(0.0, 1.0, (2, 2)) * [image_w, image_h]
  zero = np.concatenate([xy, xy], axis=1)
  inverted = np.array([[0.6 * image_w + 0.3, 0.5 * image_h + 0.7, 0.2 * image_w + 0.1,
                        0.1 * image_h + 0.2]])
  return np.concatenate([inside, partly, outside, tiny, zero, inverted]).astype(np.float32)


def _case(seed, scale):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(HEIGHT, WIDTH, CHANNELS)).astype(np.float32)
  boxes = _boxes(rng, HEIGHT / scale, WIDTH / scale)
  return features, boxes


@functools.cache
def _jitted(output_size, scale, sampling_ratio, aligned):
  return jax.jit(functools.partial(roi_align, output_size=output_size, spatial_scale=scale,
                                   sampling_ratio=sampling_ratio, aligned=aligned))


@pytest.mark.parametrize("scale", [0.25, 1 / 16])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_reference(scale, sampling_ratio, aligned):
  features, boxes = _case(int(scale * 64) + sampling_ratio, scale)
  output_size = (7, 5)
  got = _jitted(output_size, scale, sampling_ratio, aligned)(features, boxes)
  expected = np_roi_align(features, boxes, output_size, scale, sampling_ratio, aligned)
  assert got.shape == (len(boxes), 7, 5, CHANNELS) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(got[9:11], 0.0)  # the fully-outside boxes


def test_roi_align_square_default_and_eager():
  features, boxes = _case(7, 0.25)
  got = roi_align(features, boxes[:6], spatial_scale=0.25)
  expected = np_roi_align(features, boxes[:6], (7, 7), 0.25, 2, True)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  got = _jitted(4, 0.25, 2, True)(features, boxes[:3])
  assert got.shape == (3, 4, 4, CHANNELS)
  empty = _jitted((7, 7), 0.25, 2, True)(features, np.zeros((0, 4), np.float32))
  assert empty.shape == (0, 7, 7, CHANNELS)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_feature_gradient_matches_adjoint(aligned):
  features, boxes = _case(11, 0.25)
  output_size, sampling_ratio = (7, 5), 2
  cotangent = np.random.default_rng(3).normal(size=(len(boxes), *output_size, CHANNELS))
  cotangent = cotangent.astype(np.float32)
  fn = _jitted(output_size, 0.25, sampling_ratio, aligned)
  loss = lambda f, b: jnp.sum(fn(f, b) * cotangent)
  grad_f, grad_b = jax.grad(loss, argnums=(0, 1))(features, boxes)
  expected = np_roi_align_adjoint(features.shape, boxes, cotangent, output_size, 0.25,
                                  sampling_ratio, aligned)
  np.testing.assert_allclose(grad_f, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(grad_b, 0.0)


def test_roi_align_jit_vmap_batch():
  rng = np.random.default_rng(5)
  features = rng.normal(size=(3, HEIGHT, WIDTH, CHANNELS)).astype(np.float32)
  boxes = np.stack([_boxes(rng, HEIGHT * 4, WIDTH * 4) for _ in range(3)])
  batched = jax.jit(jax.vmap(lambda f, b: roi_align(f, b, (7, 5), spatial_scale=0.25)))
  got = batched(features, boxes)
  for i in range(3):
    expected = np_roi_align(features[i], boxes[i], (7, 5), 0.25, 2, True)
    np.testing.assert_allclose(got[i], expected, atol=1e-5, rtol=1e-5)


def test_roi_align_bfloat16():
  features, boxes = _case(13, 0.25)
  features = jnp.asarray(features, jnp.bfloat16)
  fn = _jitted((7, 5), 0.25, 2, True)
  got = fn(features, boxes)
  assert got.dtype == jnp.bfloat16
  expected = np_roi_align(np.asarray(features, np.float32), boxes, (7, 5), 0.25, 2, True)
  np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=2e-2, rtol=2e-2)
  grad = jax.grad(lambda f: jnp.sum(fn(f, boxes).astype(jnp.float32)))(features)
  assert grad.dtype == jnp.bfloat16


def _box_of(width, height, x=10.0, y=20.0):
  return [x, y, x + width, y + height]


def test_roi_levels_boundaries_and_clamping():
  boxes = np.array([
      _box_of(56, 56), _box_of(55.9, 55.9), _box_of(112, 112), _box_of(111.9, 111.9),
      _box_of(224, 224), _box_of(223.9, 223.9), _box_of(448, 448), _box_of(28, 112),
      _box_of(56, 224), _box_of(10000, 10000), _box_of(1, 1), _box_of(0, 0),
      _box_of(0.01, 0.01), _box_of(-5, 7), [np.nan] * 4,
  ], np.float32)
  np.testing.assert_array_equal(jax.jit(roi_levels, static_argnums=1)(boxes, 4),
                                [0, 0, 1, 0, 2, 1, 3, 0, 1, 3, 0, 0, 0, 0, 0])
  levels = jax.jit(roi_levels, static_argnums=1)(boxes, 2)
  assert levels.dtype == jnp.int32
  np.testing.assert_array_equal(levels, [0, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(roi_levels(boxes[:3], 4, finest_scale=28), [1, 0, 2])

  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 500, (200, 2))
  random_boxes = np.concatenate([xy, xy + rng.uniform(1, 900, (200, 2))], 1)
  random_boxes = random_boxes.astype(np.float32).astype(np.float64)
  scale = np.sqrt(np.prod(random_boxes[:, 2:] - random_boxes[:, :2], axis=1))
  expected = np.clip(np.floor(np.log2(scale / 56 + 1e-6)), 0, 3)
  np.testing.assert_array_equal(roi_levels(random_boxes, 4), expected)


STRIDES = (4, 8, 16, 32)


def _pyramid(rng, image_h=256, image_w=320, channels=4):
  return [rng.normal(size=(image_h // s, image_w // s, channels)).astype(np.float32)
          for s in STRIDES]


def _mixed_boxes(rng, n=40, image_h=256, image_w=320):
  sides = np.exp(rng.uniform(np.log(8), np.log(800), (n, 1))) * rng.uniform(0.6, 1.6, (n, 2))
  xy = rng.uniform(-0.2, 0.9, (n, 2)) * [image_w, image_h]
  return np.concatenate([xy, xy + sides], axis=1).astype(np.float32)


@pytest.mark.parametrize("aligned", [True, False])
def test_multilevel_equals_roi_align_on_each_level(aligned):
  rng = np.random.default_rng(21)
  pyramid, boxes = _pyramid(rng), _mixed_boxes(rng)
  levels = np.asarray(roi_levels(boxes, 4))
  assert set(levels.tolist()) == {0, 1, 2, 3}
  fn = jax.jit(functools.partial(multilevel_roi_align, level_strides=STRIDES,
                                 output_size=(7, 5), aligned=aligned))
  got = fn(pyramid, boxes)
  per_level = np.stack([_jitted((7, 5), 1 / s, 2, aligned)(f, boxes)
                        for f, s in zip(pyramid, STRIDES)])
  np.testing.assert_allclose(got, per_level[levels, np.arange(len(boxes))], atol=1e-5,
                             rtol=1e-5)
  for r in range(3):  # and against the float64 reference
    expected = np_roi_align(pyramid[levels[r]], boxes[r:r + 1], (7, 5), 1 / STRIDES[levels[r]],
                            2, aligned)
    np.testing.assert_allclose(got[r:r + 1], expected, atol=1e-5, rtol=1e-5)


def test_multilevel_gradient_flows_to_each_level():
  rng = np.random.default_rng(22)
  pyramid, boxes = _pyramid(rng), _mixed_boxes(rng)
  levels = np.asarray(roi_levels(boxes, 4))
  cotangent = rng.normal(size=(len(boxes), 7, 7, 4)).astype(np.float32)

  def multilevel_loss(feats, b):
    return jnp.sum(multilevel_roi_align(feats, b, STRIDES) * cotangent)

  def per_level_loss(feats):
    total = 0.0
    for l, (f, s) in enumerate(zip(feats, STRIDES)):
      idx = np.flatnonzero(levels == l)
      total += jnp.sum(roi_align(f, boxes[idx], spatial_scale=1 / s) * cotangent[idx])
    return total

  grads, grad_boxes = jax.jit(jax.grad(multilevel_loss, argnums=(0, 1)))(pyramid, boxes)
  expected = jax.jit(jax.grad(per_level_loss))(pyramid)
  np.testing.assert_array_equal(grad_boxes, 0.0)
  for g, e in zip(grads, expected):
    assert np.abs(g).sum() > 0
    np.testing.assert_allclose(g, e, atol=1e-5)


def test_nan_box_gives_nan_row():
  features, boxes = _case(1, 0.25)
  boxes = boxes[:3].copy()
  boxes[1, 0] = np.nan
  got = np.asarray(_jitted((7, 5), 0.25, 2, True)(features, boxes))
  assert np.isnan(got[1]).all() and np.isfinite(got[[0, 2]]).all()


def test_bad_inputs_name_the_argument():
  features, boxes = _case(0, 0.25)
  for ratio in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="sampling_ratio"):
      roi_align(features, boxes, spatial_scale=0.25, sampling_ratio=ratio)
    with pytest.raises(ValueError, match="sampling_ratio"):
      multilevel_roi_align([features], boxes, (4,), sampling_ratio=ratio)
  for bad in (features[0], features[None]):
    with pytest.raises(ValueError, match="features"):
      roi_align(bad, boxes, spatial_scale=0.25)
  with pytest.raises(ValueError, match="features"):
    roi_align(features.astype(np.int32), boxes, spatial_scale=0.25)
  for bad in (boxes[0], boxes[None], boxes[:, :3]):
    with pytest.raises(ValueError, match="boxes"):
      roi_align(features, bad, spatial_scale=0.25)
  for bad in ((0, 7), (7,), 7.0):
    with pytest.raises(ValueError, match="output_size"):
      roi_align(features, boxes, bad, spatial_scale=0.25)
  for bad in (0.0, -0.25):
    with pytest.raises(ValueError, match="spatial_scale"):
      roi_align(features, boxes, spatial_scale=bad)
  with pytest.raises(ValueError, match="features_per_level"):
    multilevel_roi_align([features[0]], boxes, (4,))
  with pytest.raises(ValueError, match="features_per_level"):
    multilevel_roi_align([features, features[..., :2]], boxes, (4, 8))
  with pytest.raises(ValueError, match="level_strides"):
    multilevel_roi_align([features, features], boxes, (4,))
  with pytest.raises(ValueError, match="num_levels"):
    roi_levels(boxes, 0)
