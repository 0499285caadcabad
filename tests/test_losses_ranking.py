"""Ranking losses against a float64 NumPy restatement of the spec, invariants and edge inputs."""

import doctest
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank import losses

import np_reference as ref

EXACT = {
    "ap": (losses.ap_loss, 1.0),
    "rank_sort": (losses.rank_sort_loss, 0.5),
    "bucketed_ap": (losses.bucketed_ap_loss, 1.0),
    "bucketed_rank_sort": (losses.bucketed_rank_sort_loss, 0.5),
}


def make_inputs(seed, n, p, *, ignored=0.1, scale=2.0, quantise=None, iou=True):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=n).astype(np.float32) * scale
  if quantise:
    logits = (np.round(logits / quantise) * quantise).astype(np.float32)
  targets = np.zeros(n, np.float32)
  chosen = rng.choice(n, size=p, replace=False)
  targets[chosen] = rng.uniform(0.05, 1.0, size=p) if iou else 1.0
  logits[chosen] += 1.0
  rest = np.setdiff1d(np.arange(n), chosen)
  targets[rng.choice(rest, size=int(ignored * n), replace=False)] = -1
  return logits, targets


def reference(name, logits, targets, delta):
  if name == "ap":
    loss, grad = ref.ap_loss(logits, targets, delta)
    return loss, grad
  if name == "rank_sort":
    ranking, sorting, grad = ref.rank_sort_loss(logits, targets, delta)
  else:
    ranking, sorting, grad = ref.bucketed_loss(logits, targets, delta,
                                               sorting=name == "bucketed_rank_sort")
  return ranking + sorting, grad


def assert_close(name, logits, targets, delta, *, loss_tol=2e-5, grad_tol=1e-4):
  fn, _ = EXACT[name]
  f = jax.jit(lambda x: fn(x, jnp.asarray(targets), delta=delta))
  value, grad = jax.value_and_grad(f)(jnp.asarray(logits))
  ref_value, ref_grad = reference(name, logits, targets, delta)
  assert abs(float(value) - ref_value) <= loss_tol, (name, float(value), ref_value)
  scale = max(np.abs(ref_grad).max(), 1e-12)
  assert np.abs(np.asarray(grad, np.float64) - ref_grad).max() / scale <= grad_tol


@pytest.mark.parametrize("name", list(EXACT))
@pytest.mark.parametrize("seed,n,p", [(0, 300, 1), (1, 500, 17), (2, 3000, 60)])
def test_matches_float64_reference(name, seed, n, p):
  logits, targets = make_inputs(seed, n, p, iou="rank_sort" in name)
  assert_close(name, logits, targets, EXACT[name][1])


@pytest.mark.parametrize("name,delta", [("ap", 0.5), ("ap", 2.0), ("rank_sort", 0.0),
                                        ("rank_sort", 1.0), ("bucketed_rank_sort", 0.0),
                                        ("bucketed_ap", 0.5)])
def test_other_deltas(name, delta):
  logits, targets = make_inputs(3, 800, 25, iou="rank_sort" in name)
  assert_close(name, logits, targets, delta)


@pytest.mark.parametrize("name", ["ap", "rank_sort"])
def test_many_ties(name):
  logits, targets = make_inputs(4, 1000, 40, quantise=0.25, iou=name == "rank_sort")
  assert_close(name, logits, targets, EXACT[name][1])


def test_large_logits_and_spread():
  """Window sums are offset per tree node: no cancellation for |s| ~ 1e4 or large N."""
  logits, targets = make_inputs(5, 4000, 50, scale=1.0)
  logits = (logits + 1e4).astype(np.float32)
  assert_close("rank_sort", logits, targets, 0.5, loss_tol=1e-4, grad_tol=2e-3)
  logits, targets = make_inputs(6, 200_000, 30, scale=0.3)
  assert_close("ap", logits, targets, 1.0, loss_tol=1e-4, grad_tol=1e-3)


@pytest.mark.parametrize("delta,case", [(1.0, "plain"), (0.5, "plain"), (2.0, "plain"),
                                        (1.0, "ties"), (0.5, "ties"), (1.0, "where")])
def test_alrp_matches_reference(delta, case):
  logits, targets = make_inputs(7, 2000, 40, iou=False, quantise=0.25 if case == "ties" else None)
  loc = np.random.default_rng(0).uniform(0, 2, size=logits.shape).astype(np.float32)
  where = np.ones(logits.shape, bool)
  if case == "where":
    where = np.random.default_rng(1).random(logits.shape) > 0.2
  kept = np.where(where, targets, -1.0)  # where=False is the same as an ignored entry
  cls_ref, loc_ref, grad_ref, grad_loc_ref = ref.alrp_loss(logits, kept, loc, delta)

  def f(x, e):
    return losses.alrp_loss(x, jnp.asarray(targets), e, delta=delta, where=where)

  (cls_loss, loc_loss) = jax.jit(f)(logits, loc)
  grad = jax.jit(jax.grad(lambda x, e: f(x, e)[0]))(logits, loc)
  grad_loc = jax.jit(jax.grad(lambda x, e: f(x, e)[1], argnums=1))(logits, loc)
  np.testing.assert_allclose([float(cls_loss), float(loc_loss)], [cls_ref, loc_ref], atol=2e-5)
  np.testing.assert_allclose(grad, grad_ref, atol=1e-4 * np.abs(grad_ref).max())
  np.testing.assert_allclose(grad_loc, grad_loc_ref, atol=1e-6)
  assert float(jnp.abs(jax.grad(lambda x: f(x, loc)[1])(jnp.asarray(logits))).max()) == 0.0
  errors = losses.ranking_errors(logits, targets, loss="alrp", delta=delta, where=where)
  _, ref_errors = ref.ranking_errors("alrp", logits, kept, delta)
  np.testing.assert_allclose(errors.ranking, ref_errors[0], atol=1e-5)
  np.testing.assert_array_equal(errors.positive, kept > 0)


@pytest.mark.parametrize("name", list(EXACT))
def test_gradient_invariants(name):
  fn, delta = EXACT[name]
  logits, targets = make_inputs(8, 2000, 30, iou="rank_sort" in name)
  grad = np.asarray(jax.grad(fn)(jnp.asarray(logits), jnp.asarray(targets)), np.float64)
  pos, neg = targets > 0, targets == 0
  tau = logits[pos].min() - delta
  assert abs(grad.sum()) < 1e-5
  assert np.all(grad[targets < 0] == 0)
  assert np.all(grad[neg & (logits < tau)] == 0)
  ref_value, ref_errors = ref.ranking_errors(name, logits, targets, delta)
  # positives lose exactly the mean ranking error (AP: the mean of 1 - interpolated precision)
  np.testing.assert_allclose(grad[pos].sum(), -ref_errors[0][pos].mean(), atol=1e-5)
  value = float(fn(jnp.asarray(logits), jnp.asarray(targets)))
  np.testing.assert_allclose(value, ref_value, atol=2e-5)
  errors = losses.ranking_errors(logits, targets, loss=name)
  np.testing.assert_allclose(errors.ranking, ref_errors[0], atol=1e-5)
  np.testing.assert_allclose(errors.sorting, ref_errors[1], atol=1e-5)
  np.testing.assert_array_equal(errors.positive, targets > 0)


def test_bucketed_rs_equals_rs_at_delta_zero_with_ties():
  logits, targets = make_inputs(9, 1500, 40, quantise=0.5)
  a = jax.value_and_grad(losses.rank_sort_loss)(jnp.asarray(logits), jnp.asarray(targets),
                                                delta=0.0)
  b = jax.value_and_grad(losses.bucketed_rank_sort_loss)(jnp.asarray(logits), jnp.asarray(targets),
                                                         delta=0.0)
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)
  np.testing.assert_allclose(a[1], b[1], atol=1e-6)


def test_bucketed_no_relevant_negatives():
  logits = jnp.array([5.0, 4.0, 3.0, -5.0, -6.0])
  targets = jnp.array([0.7, 0.9, 0.5, 0.0, 0.0])
  for fn in (losses.bucketed_ap_loss, losses.bucketed_rank_sort_loss):
    value, grad = jax.value_and_grad(fn)(logits, targets)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[3:] == 0)
  assert float(losses.bucketed_ap_loss(logits, targets)) == 0.0


ALL = {**EXACT,
       "alrp": (lambda x, y, **kw: losses.alrp_loss(x, y, jnp.ones_like(x) * 0.3, **kw)[0], 1.0)}
_SMALL = {}


def small_value_and_grad(name):
  """One compiled step per loss for all the 6-entry edge cases (targets and mask are arguments)."""
  if name not in _SMALL:
    fn = ALL[name][0]
    _SMALL[name] = jax.jit(jax.value_and_grad(lambda x, y, w: fn(x, y, where=w, max_positives=8)))
  return _SMALL[name]


LOGITS = jnp.array([2.0, -1.0, 0.5, 0.3, 1.5, -2.0])
TARGETS = jnp.array([0.0, 0.0, 0.8, 0.0, 0.6, -1.0])
EVERYWHERE = jnp.ones(6, bool)


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("case", ["no_positives", "all_ignored", "single_positive", "ties", "huge",
                                  "where"])
def test_edge_inputs(name, case):
  logits, targets, where = LOGITS, TARGETS, EVERYWHERE
  if case == "no_positives":
    targets = jnp.where(targets > 0, 0.0, targets)
  elif case == "all_ignored":
    targets = -jnp.ones_like(targets)
  elif case == "single_positive":
    targets = jnp.array([0.0, 0.0, 0.8, 0.0, 0.0, 0.0])
  elif case == "ties":
    logits = jnp.zeros_like(logits)
  elif case == "huge":
    logits = logits * 1e4
  elif case == "where":
    where = jnp.array([True, True, True, False, True, False])
  step = small_value_and_grad(name)
  value, grad = step(logits, targets, where)
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), (value, grad)
  if case in ("no_positives", "all_ignored"):
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)
  if case == "where":
    masked_value, masked = step(logits, jnp.where(where, targets, -1.0), EVERYWHERE)
    np.testing.assert_allclose(value, masked_value, atol=1e-7)
    np.testing.assert_allclose(grad, masked, atol=1e-7)
    assert float(grad[3]) == 0.0
  if case == "ties" and name in ("ap", "rank_sort"):
    assert abs(float(jnp.sum(grad))) < 1e-6


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_give_nan(name, bad):
  step = small_value_and_grad(name)
  logits = LOGITS.at[3].set(bad)
  value, grad = step(logits, TARGETS, EVERYWHERE)
  assert np.isnan(float(value))
  assert np.all(np.isnan(grad))
  # an ignored non-finite entry is fine
  value, _ = step(logits, TARGETS.at[3].set(-1.0), EVERYWHERE)
  assert np.isfinite(float(value))


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(name, dtype):
  fn, _ = ALL[name]
  logits, targets = make_inputs(10, 400, 12, iou=True)
  x = jnp.asarray(logits, dtype)
  value, grad = jax.value_and_grad(fn)(x, jnp.asarray(targets))
  assert value.dtype == jnp.float32 and grad.dtype == dtype
  expected = fn(jnp.asarray(x, jnp.float32), jnp.asarray(targets))
  np.testing.assert_allclose(value, expected, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize("name", list(EXACT))
def test_vmap_is_per_row_ranking(name):
  fn, _ = EXACT[name]
  rows = [make_inputs(20 + i, 300, 5 + i, iou=True) for i in range(3)]
  logits = jnp.asarray(np.stack([r[0] for r in rows]))
  targets = jnp.asarray(np.stack([r[1] for r in rows]))
  batched = jax.vmap(lambda x, y: fn(x, y, max_positives=16))(logits, targets)
  grads = jax.grad(
      lambda x: jax.vmap(lambda a, b: fn(a, b, max_positives=16))(x, targets).mean())(logits)
  for i in range(3):
    value, grad = jax.value_and_grad(fn)(logits[i], targets[i])
    np.testing.assert_allclose(batched[i], value, atol=1e-6)
    np.testing.assert_allclose(grads[i], grad / 3, atol=1e-7)


@pytest.mark.parametrize("name", list(EXACT))
def test_traced_targets_and_max_positives(name):
  fn, _ = EXACT[name]
  logits, targets = make_inputs(11, 500, 20, iou=True)
  expected = fn(logits, targets)
  traced = jax.jit(lambda x, y: fn(x, y))(logits, targets)  # slots = N
  sized = jax.jit(lambda x, y: fn(x, y, max_positives=32))(logits, targets)
  np.testing.assert_allclose([traced, sized], [expected, expected], atol=1e-6)
  overflow = jax.jit(lambda x, y: fn(x, y, max_positives=8))(logits, targets)
  assert np.isnan(float(overflow))
  with pytest.raises(ValueError, match="exceed max_positives"):
    fn(logits, targets, max_positives=8)


def test_multidimensional_logits_are_one_ranking():
  logits, targets = make_inputs(12, 600, 20, iou=True)
  flat = losses.rank_sort_loss(logits, targets)
  shaped = losses.rank_sort_loss(logits.reshape(4, 30, 5), targets.reshape(4, 30, 5))
  np.testing.assert_allclose(flat, shaped, atol=1e-7)
  grad = jax.grad(losses.rank_sort_loss)(jnp.asarray(logits.reshape(4, 30, 5)),
                                         targets.reshape(4, 30, 5))
  assert grad.shape == (4, 30, 5)


def test_sorting_output_carries_no_gradient():
  """Only the ranking value carries the gradient (published autograd semantics)."""
  from jaxrank.losses.ranking import _rank_sort
  logits, targets = make_inputs(13, 300, 10, iou=True)
  static = (0.5, 16)
  g_sort = jax.grad(lambda x: _rank_sort(static, x, jnp.asarray(targets), None)[1])(
      jnp.asarray(logits))
  g_rank = jax.grad(lambda x: _rank_sort(static, x, jnp.asarray(targets), None)[0])(
      jnp.asarray(logits))
  assert float(jnp.abs(g_sort).max()) == 0.0
  np.testing.assert_allclose(
      g_rank, jax.grad(losses.rank_sort_loss)(jnp.asarray(logits), jnp.asarray(targets)))


def test_bad_arguments():
  x = jnp.zeros(4)
  with pytest.raises(ValueError, match="same shape"):
    losses.ap_loss(x, jnp.zeros(5))
  with pytest.raises(ValueError, match="delta"):
    losses.ap_loss(x, x, delta=0.0)
  with pytest.raises(ValueError, match="delta"):
    losses.rank_sort_loss(x, x, delta=-1.0)
  with pytest.raises(ValueError, match="NaN"):
    losses.rank_sort_loss(x, jnp.array([0.0, np.nan, 1.0, 0.0]))
  with pytest.raises(ValueError, match="loc_errors"):
    losses.alrp_loss(x, x, jnp.zeros(3))
  with pytest.raises(ValueError, match="unknown loss"):
    losses.ranking_errors(x, x, loss="focal")
  with pytest.raises(TypeError, match="floating"):
    losses.ap_loss(jnp.zeros(4, jnp.int32), x)


SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxrank import losses
assert jax.device_count() == 8
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 512)).astype(np.float32)
y = np.zeros_like(x); y[rng.random(x.shape) < 0.02] = 0.7; y[rng.random(x.shape) < 0.1] = -1
mesh = Mesh(np.array(jax.devices()), ("data",))
sh = NamedSharding(mesh, P("data"))
for fn in (losses.ap_loss, losses.rank_sort_loss, losses.bucketed_rank_sort_loss, losses.bucketed_ap_loss):
  f = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b, max_positives=256)))
  v1, g1 = f(x, y)
  v8, g8 = f(jax.device_put(x, sh), jax.device_put(y, sh))
  np.testing.assert_allclose(v1, v8, atol=1e-6); np.testing.assert_allclose(g1, g8, atol=1e-7)
print("sharded ok")
"""  # noqa: E501


def test_sharded_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env)
  assert "sharded ok" in result.stdout, result.stdout + result.stderr


# Public modules of jaxrank.losses: each must carry at least one docstring example.
PUBLIC_MODULES = ("ranking", "bucketed", "parameterized", "classic", "balancing")


def _loss_modules():
  import pkgutil

  import jaxrank.losses
  return sorted(m.name for m in pkgutil.iter_modules(jaxrank.losses.__path__))


def test_every_public_module_is_checked():
  public = [m for m in _loss_modules() if not m.startswith("_")]
  assert sorted(public) == sorted(PUBLIC_MODULES)


@pytest.mark.parametrize("module", _loss_modules())
def test_docstring_examples(module):
  import importlib
  mod = importlib.import_module(f"jaxrank.losses.{module}")
  failures, attempted = doctest.testmod(
      mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert failures == 0
  if module in PUBLIC_MODULES:
    assert attempted > 0, f"jaxrank.losses.{module} has no docstring example"
