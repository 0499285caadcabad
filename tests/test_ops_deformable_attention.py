import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank.ops.deformable_attention import (
  ONEHOT_MAX_QUERY_TIMES_POSITIONS,
  choose_method,
  multi_scale_deformable_attention,
)

# ----------------------------------------------------------------------------------------
# Float64 loop-style reference of Deformable DETR's ms_deform_attn_core_pytorch: grid_sample
# (bilinear, zero padding, align_corners=False) per level, weighted by the attention.


def _np_corners(height, width, loc_x, loc_y):
  """In-map neighbours ``(row, col, weight, d weight / d loc_x, d weight / d loc_y)``."""
  x, y = loc_x * width - 0.5, loc_y * height - 0.5
  x0, y0 = int(np.floor(x)), int(np.floor(y))
  fx, fy = x - x0, y - y0
  corners = []
  for row, wy, dwy in ((y0, 1.0 - fy, -1.0), (y0 + 1, fy, 1.0)):
    for col, wx, dwx in ((x0, 1.0 - fx, -1.0), (x0 + 1, fx, 1.0)):
      if 0 <= row < height and 0 <= col < width:
        corners.append((row, col, wy * wx, dwx * wy * width, dwy * wx * height))
  return corners


def _np_samples(shapes, locations):
  """Yields ``(b, q, m, l, p, position, weight, d_loc_x, d_loc_y)`` of every in-map corner."""
  starts = np.cumsum([0] + [h * w for h, w in shapes])
  batch, queries, heads, levels, points, _ = locations.shape
  for b, q, m, l, p in np.ndindex(batch, queries, heads, levels, points):
    height, width = shapes[l]
    loc_x, loc_y = locations[b, q, m, l, p]
    for row, col, w, dx, dy in _np_corners(height, width, loc_x, loc_y):
      yield b, q, m, l, p, starts[l] + row * width + col, w, dx, dy


def np_deform_attn(value, shapes, locations, attention):
  value, locations = np.asarray(value, np.float64), np.asarray(locations, np.float64)
  attention = np.asarray(attention, np.float64)
  batch, _, heads, head_dim = value.shape
  out = np.zeros((batch, locations.shape[1], heads, head_dim))
  for b, q, m, l, p, s, w, _, _ in _np_samples(shapes, locations):
    out[b, q, m] += attention[b, q, m, l, p] * w * value[b, s, m]
  return out.reshape(batch, locations.shape[1], heads * head_dim)


def np_deform_attn_grads(value, shapes, locations, attention, cotangent):
  """Gradients of ``sum(np_deform_attn(...) * cotangent)`` (linear in value and attention)."""
  value, locations = np.asarray(value, np.float64), np.asarray(locations, np.float64)
  attention = np.asarray(attention, np.float64)
  batch, _, heads, head_dim = value.shape
  cotangent = np.asarray(cotangent, np.float64).reshape(batch, -1, heads, head_dim)
  grad_value, grad_attention = np.zeros_like(value), np.zeros_like(attention)
  grad_locations = np.zeros_like(locations)
  for b, q, m, l, p, s, w, dx, dy in _np_samples(shapes, locations):
    a = attention[b, q, m, l, p]
    grad_value[b, s, m] += a * w * cotangent[b, q, m]
    dot = float(value[b, s, m] @ cotangent[b, q, m])
    grad_attention[b, q, m, l, p] += w * dot
    grad_locations[b, q, m, l, p] += a * dot * np.array([dx, dy])
  return grad_value, grad_locations, grad_attention


# ----------------------------------------------------------------------------------------

SHAPES = ((5, 7), (3, 4), (2, 3))
BATCH, QUERIES, HEADS, HEAD_DIM, POINTS = 2, 6, 3, 4, 4


def _case(seed, shapes=SHAPES, queries=QUERIES, away_from_pixels=False):
  """Random inputs; locations in [-0.2, 1.2], on the map borders and on pixel centres."""
  rng = np.random.default_rng(seed)
  positions = sum(h * w for h, w in shapes)
  value = rng.normal(size=(BATCH, positions, HEADS, HEAD_DIM)).astype(np.float32)
  loc = rng.uniform(-0.2, 1.2, (BATCH, queries, HEADS, len(shapes), POINTS, 2))
  if shapes != SHAPES:
    return (value, loc.astype(np.float32),
            rng.uniform(0.0, 1.0, loc.shape[:-1]).astype(np.float32))
  loc[0, 0, :, :, 0] = 0.0
  loc[0, 1, :, :, 0] = 1.0
  loc[1, 0, :, :, 1] = [0.0, 1.0]
  loc[1, 1, :, :, 1] = [1.0, 0.0]
  loc[0, 2, 0, 0, 2] = [-0.5 / 7, 1.5 / 5]  # exactly one pixel outside the left edge
  loc[0, 2, 0, 0, 3] = [7.5 / 7, -0.5 / 5]  # one pixel outside the right and top edges
  loc[0, 3, 1, 0, 1] = [-1.0, 2.0]  # far outside
  loc = loc.astype(np.float32)
  if away_from_pixels:  # the location gradient jumps at integer pixel coordinates
    sizes = np.array([[w, h] for h, w in shapes], np.float64)[:, None, :]
    pixel = loc.astype(np.float64) * sizes - 0.5
    near = np.abs(pixel - np.round(pixel)) < 1e-3
    loc = np.where(near, loc + np.float32(3e-3), loc).astype(np.float32)
  else:  # exactly on pixel centres
    loc[1, 2, 2, 1, 3] = [2.5 / 4, 0.5 / 3]
  attention = rng.uniform(0.0, 1.0, (BATCH, queries, HEADS, len(shapes), POINTS))
  return value, loc, attention.astype(np.float32)


@functools.cache
def _jitted(shapes, method):
  return jax.jit(functools.partial(multi_scale_deformable_attention, spatial_shapes=shapes,
                                   method=method))


def _call(value, loc, attention, shapes=SHAPES, method="gather"):
  return _jitted(shapes, method)(value, sampling_locations=loc, attention_weights=attention)


@pytest.mark.parametrize("method", ["gather", "onehot", "auto"])
def test_matches_reference(method):
  value, loc, attention = _case(0)
  got = _call(value, loc, attention, method=method)
  assert got.shape == (BATCH, QUERIES, HEADS * HEAD_DIM) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_deform_attn(value, SHAPES, loc, attention), atol=1e-5,
                             rtol=1e-5)


@pytest.mark.parametrize("method", ["gather", "onehot"])
def test_border_and_outside_samples(method):
  # loc 0 or 1 sits half a pixel outside the edge pixel's centre: a quarter of a corner.
  corners = _np_corners(5, 7, 0.0, 1.0)
  assert [(r, c, w) for r, c, w, *_ in corners] == [(4, 0, 0.25)]
  assert _np_corners(5, 7, -1.0, 2.0) == []
  value, loc, attention = _case(0)
  for index, expected in (((0, 0, 0, 0, 0), 0.25 * value[0, 0, 0]),
                          ((1, 0, 2, 0, 1), 0.25 * value[1, 28, 2]),
                          ((0, 2, 0, 0, 2), 0.0), ((0, 3, 1, 0, 1), 0.0)):
    only = np.zeros_like(attention)
    only[index] = 1.0
    got = np.asarray(_call(value, loc, only, method=method))
    got = got.reshape(BATCH, QUERIES, HEADS, HEAD_DIM)[index[:3]]
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["gather", "onehot"])
def test_gradients_match_reference(method):
  value, loc, attention = _case(1, away_from_pixels=True)
  cotangent = np.random.default_rng(2).normal(size=(BATCH, QUERIES, HEADS * HEAD_DIM))
  cotangent = cotangent.astype(np.float32)
  fn = _jitted(SHAPES, method)
  loss = lambda v, l, a: jnp.sum(fn(v, sampling_locations=l, attention_weights=a) * cotangent)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(value, loc, attention)
  expected = np_deform_attn_grads(value, SHAPES, loc, attention, cotangent)
  for name, g, e in zip(("value", "locations", "attention"), grads, expected):
    assert g.dtype == jnp.float32, name
    np.testing.assert_allclose(g, e, atol=2e-4, rtol=2e-4, err_msg=name)
  assert np.abs(expected[1]).max() > 1.0  # the location gradient is exercised


def test_reference_location_gradient_is_the_derivative():
  value, loc, attention = _case(1, away_from_pixels=True)
  cotangent = np.random.default_rng(2).normal(size=(BATCH, QUERIES, HEADS * HEAD_DIM))
  _, grad_loc, _ = np_deform_attn_grads(value, SHAPES, loc, attention, cotangent)
  loc = loc.astype(np.float64)
  eps = 1e-6
  for index in [(0, 4, 1, 0, 2, 0), (1, 5, 2, 1, 1, 1), (1, 3, 0, 2, 3, 0), (0, 5, 2, 0, 0, 1)]:
    plus, minus = loc.copy(), loc.copy()
    plus[index] += eps
    minus[index] -= eps
    numeric = np.sum((np_deform_attn(value, SHAPES, plus, attention)
                      - np_deform_attn(value, SHAPES, minus, attention)) * cotangent) / (2 * eps)
    np.testing.assert_allclose(grad_loc[index], numeric, rtol=1e-6, atol=1e-6)


def test_batch_elements_are_independent():
  value, loc, attention = _case(3)
  got = _call(value, loc, attention)
  for b in range(BATCH):
    single = _call(value[b:b + 1], loc[b:b + 1], attention[b:b + 1])
    np.testing.assert_allclose(got[b:b + 1], single, atol=1e-6)


def test_single_level_and_eager():
  shapes = ((4, 6),)
  value, loc, attention = _case(4, shapes=shapes, queries=3)
  expected = np_deform_attn(value, shapes, loc, attention)
  for method in ("gather", "onehot"):
    got = multi_scale_deformable_attention(value, shapes, loc, attention, method=method)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  as_array = multi_scale_deformable_attention(value, np.array(shapes), loc, attention)
  np.testing.assert_allclose(as_array, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["gather", "onehot"])
def test_bfloat16(method):
  value, loc, attention = _case(5)
  value = jnp.asarray(value, jnp.bfloat16)
  got = _call(value, loc, attention, method=method)
  assert got.dtype == jnp.bfloat16
  expected = np_deform_attn(np.asarray(value, np.float32), SHAPES, loc, attention)
  np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=2e-2, rtol=2e-2)
  fn = _jitted(SHAPES, method)
  loss = lambda v, l, a: jnp.sum(fn(v, sampling_locations=l, attention_weights=a)
                                 .astype(jnp.float32))
  grads = jax.grad(loss, argnums=(0, 1, 2))(value, loc, attention)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]
  expected = np_deform_attn_grads(np.asarray(value, np.float32), SHAPES, loc, attention,
                                  np.ones(got.shape))[0]
  np.testing.assert_allclose(np.asarray(grads[0], np.float32), expected, rtol=1e-2, atol=1e-2)
  everything_bf16 = _call(value, jnp.asarray(loc, jnp.bfloat16),
                          jnp.asarray(attention, jnp.bfloat16), method=method)
  assert everything_bf16.dtype == jnp.bfloat16


@pytest.mark.parametrize("method", ["gather", "onehot"])
def test_nan_location_gives_nan_for_its_query_and_head(method):
  value, loc, attention = _case(6)
  loc[1, 2, 1, 0, 3, 0] = np.nan
  loc[0, 4, 2, :, 0, 0] = np.inf
  loc[0, 4, 2, :, 1:, 1] = -np.inf
  attention[0, 4, 2] = 1.0
  got = np.array(_call(value, loc, attention, method=method)).reshape(BATCH, QUERIES, HEADS,
                                                                         HEAD_DIM)
  assert np.isnan(got[1, 2, 1]).all()
  np.testing.assert_array_equal(got[0, 4, 2], 0.0)  # infinite locations are outside
  got[1, 2, 1] = 0.0
  assert np.isfinite(got).all()


def test_auto_method_per_backend():
  assert choose_method(300, 5440, "cpu") == "gather"
  assert choose_method(300, 5440, "gpu") == "gather"
  assert choose_method(300, 5440, "tpu") == "onehot"
  assert choose_method(5440, 5440, "tpu") == "gather"
  assert choose_method(1, ONEHOT_MAX_QUERY_TIMES_POSITIONS, "tpu") == "onehot"
  assert choose_method(2, ONEHOT_MAX_QUERY_TIMES_POSITIONS, "tpu") == "gather"


def test_bad_inputs_name_the_problem():
  value, loc, attention = _case(0)
  call = multi_scale_deformable_attention
  with pytest.raises(ValueError, match=r"sum\(H_l \* W_l\) = 53 .* S = 54"):
    call(np.concatenate([value, value[:, :1]], 1), SHAPES, loc, attention)
  for bad in (((5, 7), (3, 4), (2, 3.0)), ((5, 7, 1),), (), 5, ((5, 7), (3, 4), (0, 3)),
              jnp.array(SHAPES), ((5, 7), (3, 4), (True, 3))):
    with pytest.raises(ValueError, match="spatial_shapes"):
      call(value, bad, loc, attention)
  with pytest.raises(ValueError, match="value must be"):
    call(value[0], SHAPES, loc, attention)
  with pytest.raises(ValueError, match="value must be floating"):
    call(value.astype(np.int32), SHAPES, loc, attention)
  for bad in (loc[..., :1], loc[:, :, :, :2], loc[:1], loc[:, :, :2], loc[..., 0, :]):
    with pytest.raises(ValueError, match="sampling_locations must be"):
      call(value, SHAPES, bad, attention)
  for bad in (attention[..., :2], attention[:, :3], attention[..., None]):
    with pytest.raises(ValueError, match="attention_weights must be"):
      call(value, SHAPES, loc, bad)
  with pytest.raises(ValueError, match="method"):
    call(value, SHAPES, loc, attention, method="dense")
