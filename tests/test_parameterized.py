"""Parameterized AP Loss (spec §6) against a float64 NumPy restatement of the published code."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank import losses
from jaxrank.losses import parameterized as pap

# ---------------------------------------------------------------------------------------------
# float64 NumPy restatement of the published `_linear` and `paploss` (spec §6.2, §6.3)


def np_linear(x, knots):
  """Published `_linear`: value and slope of the selected segment."""
  x = np.asarray(x, np.float64)
  knots = np.asarray(knots, np.float64)
  kx, ky = knots[0::2], knots[1::2]
  idx = (x[..., None] > kx).sum(-1) + (kx == 0).sum() * (x == 0) - 1
  slope = (ky[idx + 1] - ky[idx]) / (kx[idx + 1] - kx[idx])
  return slope * (x - kx[idx]) + ky[idx], slope


def np_pap(s, y, u, params, top_k, detached=None):
  """Loss value; ``detached`` (default ``s``): the logits the stop-gradient ``f_H1`` sees."""
  s = np.asarray(s, np.float64).ravel()
  sd = s if detached is None else np.asarray(detached, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  u = np.where(y > 0, np.asarray(u, np.float64).ravel(), 0.0)
  f = lambda x, name: np_linear(x, getattr(params, name))[0]
  valid = np.flatnonzero(y >= 0)
  pos = np.flatnonzero(y > 0)
  if len(pos) == 0:
    return 0.0
  rows = valid
  if len(valid) > top_k:
    rows = valid[np.argsort(-s[valid], kind="stable")[:top_k]]
  x = np.clip((s[rows][:, None] - s[pos][None, :]) / 2 + 0.5, 0, 1)
  num = (f(x, "h2") * (1 - f(u[rows], "i2"))[:, None] * f(u[pos], "i3")[None, :]).sum(0)
  xd = np.clip((sd[rows][:, None] - sd[pos][None, :]) / 2 + 0.5, 0, 1)
  ell = (1 - f(u[pos], "i1")) + num / f(xd, "h1").sum(0)
  return ell.sum() / (len(pos) + 1e-8)


def np_grad(fun, x, h=1e-6):
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = h
    g[i] = (fun(x + e) - fun(x - e)) / (2 * h)
  return g


def np_knots(theta):
  """Spec §6.3: (x_1, y_1) = θ_1,2; (x_k, y_k) = θ ⊙ (1 - prev) + prev."""
  prev, points = np.zeros(2), [np.zeros(2)]
  for k in range(4):
    prev = np.asarray(theta[2 * k:2 * k + 2], np.float64) * (1 - prev) + prev
    points.append(prev)
  return np.concatenate(points + [np.ones(2)])


def _random_params(seed):
  theta = np.random.default_rng(seed).uniform(0.05, 0.95, pap.NUM_SEARCH_PARAMS)
  funcs = {name: np_knots(theta[8 * m:8 * m + 8]).astype(np.float32)
           for m, name in enumerate(pap.FUNCTION_ORDER)}
  return losses.PAPParams(grad_scale=float(10 ** (2 * theta[-1] - 1)), **funcs)


def _problem(seed, shape=(12, 5), num_pos=8, num_ignored=10, scale=1.5):
  rng = np.random.default_rng(seed)
  n = int(np.prod(shape))
  logits = (rng.normal(size=n) * scale).astype(np.float32)
  targets = np.zeros(n, np.float32)
  perm = rng.permutation(n)
  targets[perm[:num_pos]] = 1.0
  targets[perm[num_pos:num_pos + num_ignored]] = -1.0
  quality = rng.uniform(0, 1, n).astype(np.float32)
  return logits.reshape(shape), targets.reshape(shape), quality.reshape(shape)


# ---------------------------------------------------------------------------------------------
# piecewise_linear

_PL_LEN = 64


@jax.jit
def _pl_jit(x, knots):
  return jax.vmap(jax.value_and_grad(losses.piecewise_linear, (0, 1)), (0, None))(x, knots)


def _pl(x, knots):
  """(value, d/dx, d/dknots) at each x, through one compiled function."""
  x = np.atleast_1d(np.asarray(x, np.float32))
  padded = np.concatenate([x, np.full(_PL_LEN - len(x), 0.5, np.float32)])
  y, (gx, gk) = _pl_jit(padded, np.asarray(knots, np.float32))
  return np.asarray(y)[:len(x)], np.asarray(gx)[:len(x)], np.asarray(gk)[:len(x)]


def test_piecewise_linear_matches_published_formula():
  rng = np.random.default_rng(0)
  for _ in range(3):
    knots = np.asarray(losses.knots_from_theta(rng.uniform(0.05, 0.95, 8)), np.float32)
    x = np.concatenate([rng.uniform(0, 1, 40), knots[0::2], [0.0, 1.0]]).astype(np.float32)
    ref, slope = np_linear(x, knots)
    y, gx, _ = _pl(x, knots)
    np.testing.assert_allclose(y, ref, atol=1e-6)
    np.testing.assert_allclose(gx, slope, rtol=1e-5)  # at exact knots: the left slope (published)
    np.testing.assert_allclose(losses.piecewise_linear(x, knots), ref, atol=1e-6)  # eager path


def test_piecewise_linear_left_slope_at_knot_and_knot_gradient():
  knots = np.array([0, 0, 0.25, 0.5, 0.5, 0.6, 0.75, 0.65, 0.9, 0.8, 1, 1], np.float32)
  xs = [0.5, 0.5000001, 0.0, 1.0, 0.1, 0.3, 0.6, 0.95, 1.5, -0.5]
  y, gx, gk = _pl(xs, knots)
  assert gx[0] == pytest.approx((0.6 - 0.5) / 0.25)       # exactly at the knot 0.5: left segment
  assert gx[1] == pytest.approx((0.65 - 0.6) / 0.25, rel=1e-4)
  assert gx[2] == pytest.approx(2.0)
  assert gx[3] == pytest.approx(2.0, rel=1e-5)
  # differentiable w.r.t. the knots: finite differences of the published formula
  for i in range(4, 8):
    ref = np_grad(lambda k: np_linear(np.float64(xs[i]), k)[0], knots.astype(np.float64))  # noqa: B023
    np.testing.assert_allclose(gk[i], ref, atol=1e-4)
  # outside [0, 1]: clamped, no gradient
  assert (y[8], y[9]) == (1.0, 0.0)
  assert gx[8] == 0.0 and gx[9] == 0.0


def test_piecewise_linear_repeated_knots_finite():
  cases = [
      [0, 0, 0.4, 0.2, 0.4, 0.5, 0.7, 0.6, 0.7, 0.6, 1, 1],     # repeated interior knots
      [0, 0, 0, 0.3, 0.5, 0.5, 1, 0.9, 1, 0.9, 1, 1],           # θ = 0 and 1 from clipped samples
      [0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1],                     # vertical jump at 1
  ]
  x = np.concatenate([np.linspace(0, 1, 21), [0.4, 0.7]]).astype(np.float32)
  for knots in cases:
    knots = np.asarray(knots, np.float32)
    y, gx, gk = _pl(x, knots)
    assert np.isfinite(y).all() and np.isfinite(gx).all() and np.isfinite(gk).all()
    assert (np.diff(y[:21]) >= -1e-7).all()
    with np.errstate(divide="ignore", invalid="ignore"):
      ref = np_linear(x, knots)[0]
    ok = np.isfinite(ref)  # where the published formula does not divide by zero
    np.testing.assert_allclose(y[ok], ref[ok], atol=1e-6)


def test_piecewise_linear_batched_knots():
  rng = np.random.default_rng(1)
  knots = np.asarray(losses.knots_from_theta(rng.uniform(0.05, 0.95, (3, 8))), np.float32)
  x = rng.uniform(0, 1, (5, 3)).astype(np.float32)
  out = losses.piecewise_linear(x, knots)
  assert out.shape == (5, 3)
  for c in range(3):
    np.testing.assert_allclose(out[:, c], np_linear(x[:, c], knots[c])[0], atol=1e-6)
  with pytest.raises(ValueError):
    losses.piecewise_linear(x, knots[:, :10])


# ---------------------------------------------------------------------------------------------
# search parametrisation and presets


def test_theta_knots_round_trip_and_monotone():
  rng = np.random.default_rng(2)
  theta = rng.uniform(0, 1, (64, 8))
  knots = np.asarray(losses.knots_from_theta(theta), np.float64)
  assert knots.shape == (64, 12)
  np.testing.assert_allclose(knots, [np_knots(t) for t in theta], atol=1e-6)
  np.testing.assert_array_equal(knots[:, :2], 0.0)
  np.testing.assert_array_equal(knots[:, -2:], 1.0)
  assert ((np.diff(knots[:, 0::2], axis=1) >= 0).all()
          and (np.diff(knots[:, 1::2], axis=1) >= 0).all())
  np.testing.assert_allclose(losses.theta_from_knots(knots), theta, atol=2e-4)
  # clipped away from exactly 0 / 1: strictly increasing knots for extreme θ
  extreme = np.asarray(losses.knots_from_theta(np.array([0.0, 1.0] * 4)), np.float64)
  assert (np.diff(extreme[0::2][:4]) > 0).all()


def test_identity_theta_gives_identity_knots():
  knots = losses.knots_from_theta(np.array([0.2, 0.2, 0.25, 0.25, 1 / 3, 1 / 3, 0.5, 0.5]))
  np.testing.assert_allclose(knots, pap.PRESETS["identity"].h1, atol=1e-6)
  np.testing.assert_allclose(losses.theta_from_knots(pap.PRESETS["identity"].h2),
                             pap.IDENTITY_THETA, atol=1e-6)
  x = np.linspace(0, 1, 11, dtype=np.float32)
  np.testing.assert_allclose(losses.piecewise_linear(x, knots), x, atol=1e-6)


def test_reg_weight_and_flat_vectors():
  np.testing.assert_allclose(losses.reg_weight_from_theta(np.array([0.0, 0.5, 1.0])),
                             [0.1, 1.0, 10.0], rtol=1e-6)
  np.testing.assert_allclose(losses.theta_from_reg_weight(4.1231), (np.log10(4.1231) + 1) / 2,
                             rtol=1e-6)
  rng = np.random.default_rng(3)
  theta = rng.uniform(0.01, 0.99, 41)
  params = losses.params_from_theta(theta)
  # order H2 I2 I3 I1 H1
  np.testing.assert_allclose(params.h2, losses.knots_from_theta(theta[0:8]))
  np.testing.assert_allclose(params.i1, losses.knots_from_theta(theta[24:32]))
  np.testing.assert_allclose(params.h1, losses.knots_from_theta(theta[32:40]))
  np.testing.assert_allclose(params.grad_scale, 10 ** (2 * theta[40] - 1), rtol=1e-5)
  np.testing.assert_allclose(losses.theta_from_params(params), theta, atol=2e-4)
  batched = losses.params_from_theta(np.stack([theta, theta]))
  assert batched.h1.shape == (2, 12) and batched.grad_scale.shape == (2,)
  theta82 = rng.uniform(0.01, 0.99, 82)
  rpn, rcnn = losses.faster_rcnn_params_from_theta(theta82)
  np.testing.assert_allclose(rpn.h2, losses.knots_from_theta(theta82[0:8]))
  np.testing.assert_allclose(rcnn.h2, losses.knots_from_theta(theta82[40:48]))
  np.testing.assert_allclose([rpn.grad_scale, rcnn.grad_scale], 10 ** (2 * theta82[80:] - 1),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.theta_from_faster_rcnn_params(rpn, rcnn), theta82, atol=2e-4)
  with pytest.raises(ValueError):
    losses.params_from_theta(theta[:40])


def test_presets_published_values_and_monotone():
  p = losses.PRESETS
  assert set(p) == {"retinanet", "faster_rcnn_rpn", "faster_rcnn_rcnn", "identity"}
  assert p["retinanet"].grad_scale == 4.1231
  assert p["faster_rcnn_rpn"].grad_scale == 1.6950
  assert p["faster_rcnn_rcnn"].grad_scale == 7.1324
  assert p["identity"].grad_scale == 1.0
  np.testing.assert_array_equal(p["retinanet"].h2[2:4], np.float32([0.4182, 0.0277]))
  np.testing.assert_array_equal(p["retinanet"].h1[8:10], np.float32([0.8097, 0.9083]))
  np.testing.assert_array_equal(p["faster_rcnn_rpn"].i1[2:4], np.float32([0.0045, 0.3599]))
  np.testing.assert_array_equal(p["faster_rcnn_rcnn"].i3[6:8], np.float32([0.6047, 0.6647]))
  for name, params in p.items():
    for fn in pap.FUNCTION_ORDER:
      k = np.asarray(getattr(params, fn))
      assert k.shape == (12,), name
      np.testing.assert_array_equal(k[[0, 1, 10, 11]], [0, 0, 1, 1])
      assert (np.diff(k[0::2]) > 0).all() and (np.diff(k[1::2]) >= 0).all(), (name, fn)
      assert float(losses.piecewise_linear(0.5, k)) >= 0
    assert float(losses.piecewise_linear(0.5, params.h1)) > 0  # spec 9.17: Σ H1 > 0
    back = losses.params_from_theta(losses.theta_from_params(params), eps=0)
    for fn in pap.FUNCTION_ORDER:
      np.testing.assert_allclose(getattr(back, fn), getattr(params, fn), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the loss (compiled once per static configuration: params are traced)

N = 60


@partial(jax.jit, static_argnames=("top_k", "block_rows", "max_positives"))
def _vg(logits, targets, quality, params, where=None, *, top_k=100_000, block_rows=None,
        max_positives=None):
  fn = lambda s, u: losses.parameterized_ap_loss(s, targets, u, params, where=where, top_k=top_k,
                                                 block_rows=block_rows, max_positives=max_positives)
  value, (g_s, g_u) = jax.value_and_grad(fn, (0, 1))(logits, quality)
  return value, g_s, g_u


def _check_against_reference(logits, targets, quality, params, top_k, **kw):
  value, g_s, g_u = _vg(logits, targets, quality, params, top_k=top_k, **kw)
  assert float(value) == pytest.approx(np_pap(logits, targets, quality, params, top_k), rel=1e-5)
  ref_s = np_grad(lambda s: np_pap(s, targets, quality, params, top_k, logits), logits)
  ref_u = np_grad(lambda u: np_pap(logits, targets, u, params, top_k), quality)
  np.testing.assert_allclose(g_s, ref_s, atol=2e-5 * max(1.0, np.abs(ref_s).max()))
  np.testing.assert_allclose(g_u, ref_u, atol=2e-5 * max(1.0, np.abs(ref_u).max()))
  assert (np.asarray(g_s)[targets < 0] == 0).all()
  assert (np.asarray(g_u)[targets <= 0] == 0).all()


@pytest.mark.parametrize("preset", ["retinanet", "faster_rcnn_rpn", "random"])
def test_loss_matches_reference_value_and_grad(preset):
  # top_k = 20 of 50 valid entries: the row restriction matters; blocks of 3 rows (one padded)
  logits, targets, quality = _problem(4, shape=(N,))
  params = _random_params(5) if preset == "random" else losses.PRESETS[preset]
  _check_against_reference(logits, targets, quality, params, 20, block_rows=3)


def test_skipped_blocks_far_rows_exact():
  # rows far above and far below every positive (blocks done in O(B)) plus a few near ones
  rng = np.random.default_rng(6)
  logits = np.concatenate([rng.uniform(5, 8, 18), rng.uniform(-1, 1, 12), rng.uniform(-9, -4, 30)])
  targets = np.zeros(N, np.float32)
  targets[18:24] = 1.0
  targets[40] = -1.0
  quality = rng.uniform(0, 1, N)
  _check_against_reference(logits.astype(np.float32), targets, quality.astype(np.float32),
                           _random_params(7), 20, block_rows=3)
  _check_against_reference(-logits.astype(np.float32), targets, quality.astype(np.float32),
                           _random_params(7), 20, block_rows=3)


def test_identity_functions_hand_formula():
  logits, targets, quality = _problem(8, shape=(N,), num_pos=6, num_ignored=4)
  s, y = logits.astype(np.float64), targets
  u = np.where(y > 0, quality, 0.0).astype(np.float64)
  rows, pos = np.flatnonzero(y >= 0), np.flatnonzero(y > 0)
  x = np.clip((s[rows][:, None] - s[pos][None, :]) / 2 + 0.5, 0, 1)
  ell = (1 - u[pos]) + (x * (1 - u[rows])[:, None]).sum(0) * u[pos] / x.sum(0)
  value = _vg(logits, targets, quality, losses.PRESETS["identity"])[0]
  assert float(value) == pytest.approx(ell.mean(), rel=1e-5)


def test_jit_vmap_overflow_where_and_bfloat16():
  logits, targets, quality = _problem(9, shape=(3, 6, 10), num_pos=15, num_ignored=9)
  targets[2] = np.where(targets[2] > 0, 0.0, targets[2])
  targets[2, 0, :9] = 1.0  # batch element 2: 9 positives > max_positives
  params = losses.PRESETS["retinanet"]
  fn = partial(losses.parameterized_ap_loss, params=params, top_k=15, max_positives=8)
  batched = jax.jit(jax.vmap(fn))(logits, targets, quality)  # shaped [6, 10] inputs, vmapped
  for b in range(2):
    assert float(batched[b]) == pytest.approx(
        np_pap(logits[b], targets[b], quality[b], params, 15), rel=1e-5)
  assert (targets[2] > 0).sum() > 8 and np.isnan(float(batched[2]))  # overflow: NaN
  # where=False is the same as target -1; bfloat16 logits: float32 loss of the rounded
  # logits, bfloat16 gradient
  logits, targets, quality = logits[0].ravel(), targets[0].ravel(), quality[0].ravel()
  mask = np.ones(N, bool)
  mask[:7] = False
  lb = jnp.asarray(logits, jnp.bfloat16)
  value, g_s, _ = _vg(lb, targets, quality, params, mask)
  assert value.dtype == jnp.float32 and g_s.dtype == jnp.bfloat16
  rounded = np.asarray(lb.astype(jnp.float32))
  ref = np_pap(rounded, np.where(mask, targets, -1.0), quality, params, 10**5)
  assert float(value) == pytest.approx(ref, rel=1e-5)
  assert (np.isfinite(np.asarray(g_s, np.float32)).all()
          and (np.asarray(g_s, np.float32)[:7] == 0).all())


def test_no_positives_all_ignored_overflow_nonfinite():
  params = losses.PRESETS["retinanet"]
  logits, targets, quality = _problem(10, shape=(N,), num_pos=4, num_ignored=3)
  for t in (np.where(targets > 0, 0.0, targets), np.full_like(targets, -1.0)):
    value, g_s, g_u = _vg(logits, t, quality, params)
    assert float(value) == 0.0
    assert (np.asarray(g_s) == 0).all() and (np.asarray(g_u) == 0).all()
  # more positives than slots: an error for concrete targets (NaN when traced, see above)
  with pytest.raises(ValueError):
    losses.parameterized_ap_loss(logits, targets, quality, params, max_positives=2)
  bad = logits.copy()
  bad[np.flatnonzero(targets == 0)[0]] = np.inf
  assert np.isnan(float(_vg(bad, targets, quality, params)[0]))
  ignored_nan = logits.copy()
  ignored_nan[np.flatnonzero(targets < 0)[0]] = np.nan
  value, g_s, g_u = _vg(ignored_nan, targets, quality, params)
  assert float(value) == pytest.approx(np_pap(logits, targets, quality, params, 10**5), rel=1e-5)
  assert np.isfinite(g_s).all() and np.isfinite(g_u).all()
  with pytest.raises(ValueError):
    losses.parameterized_ap_loss(logits, targets, quality[:5], params)
  with pytest.raises(ValueError):
    losses.parameterized_ap_loss(logits, targets, quality, params, top_k=0)
  with pytest.raises(ValueError):
    losses.parameterized_ap_loss(logits, targets, quality, params._replace(h1=params.h1[:10]))


def _max_aval_size(jaxpr):
  biggest = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          biggest = max(biggest, _max_aval_size(inner))
  return biggest


def test_reverse_mode_memory_is_blocked():
  n, slots, block, k = 600, 64, 16, 512
  logits, targets, quality = _problem(11, shape=(n,), num_pos=40, num_ignored=20)
  fn = lambda s, u: losses.parameterized_ap_loss(s, targets, u, losses.PRESETS["retinanet"],
                                                 top_k=k, max_positives=slots, block_rows=block)
  jaxpr = jax.make_jaxpr(jax.grad(fn, (0, 1)))(logits, quality).jaxpr
  # nothing of size k·P (32768) or (k / B)·P (2048) is kept: only blocks and vectors
  assert _max_aval_size(jaxpr) <= max(block * slots, n, k)


def test_grad_scale():
  f = lambda x: jnp.sum(losses.grad_scale(x, 4.0) ** 2)
  x = jnp.array([1.0, -2.0])
  np.testing.assert_allclose(jax.grad(f)(x), 4.0 * 2 * np.asarray(x))
  assert float(losses.grad_scale(x, 4.0)[1]) == -2.0
  tree = {"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(3)}
  g = jax.grad(lambda t, s: jnp.sum(losses.grad_scale(t, s)["a"].astype(jnp.float32)) +
               jnp.sum(losses.grad_scale(t, s)["b"]), argnums=(0, 1))(tree, jnp.float32(0.5))
  assert g[0]["a"].dtype == jnp.bfloat16 and float(g[0]["a"][0]) == 0.5 and float(g[1]) == 0.0
  assert float(jax.jit(jax.grad(lambda x, s: losses.grad_scale(x, s) * 3.0))(1.0, 2.0)) == 6.0
