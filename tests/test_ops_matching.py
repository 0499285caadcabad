import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from jaxrank.ops.matching import Matching, hungarian_match

match = jax.jit(hungarian_match)


def _check_valid(m: Matching, gt_mask):
  """One-to-one, consistent both ways, as many real gt matched as possible."""
  query_index, matched, gt_index = (np.asarray(a) for a in m)
  batch, num_gt = gt_mask.shape
  num_queries = gt_index.shape[1]
  assert query_index.dtype == np.int32 and gt_index.dtype == np.int32 and matched.dtype == bool
  for b in range(batch):
    assert not matched[b][~gt_mask[b]].any()
    assert matched[b].sum() == min(num_queries, gt_mask[b].sum())
    queries = query_index[b][matched[b]]
    assert len(set(queries.tolist())) == len(queries)
    assert ((queries >= 0) & (queries < num_queries)).all()
    np.testing.assert_array_equal(query_index[b][~matched[b]], 0)
    expected = np.full(num_queries, -1)
    expected[queries] = np.flatnonzero(matched[b])
    np.testing.assert_array_equal(gt_index[b], expected)


def _real_cost(m: Matching, cost, b):
  gts = np.flatnonzero(np.asarray(m.matched[b]))
  return np.asarray(cost[b], np.float64)[np.asarray(m.query_index[b])[gts], gts].sum()


def _scipy_cost(cost, gt_mask, b):
  real = np.asarray(cost[b], np.float64)[:, gt_mask[b]]
  rows, cols = linear_sum_assignment(real)
  return real[rows, cols].sum()


def _case(seed, batch, queries, num_gt, reals, integer=False):
  rng = np.random.default_rng(seed)
  if integer:  # many ties
    cost = rng.integers(0, 4, (batch, queries, num_gt)).astype(np.float32)
  else:
    cost = rng.normal(size=(batch, queries, num_gt)).astype(np.float32) * 3.0
  gt_mask = np.zeros((batch, num_gt), bool)
  for b, n in enumerate(reals):
    gt_mask[b, rng.permutation(num_gt)[:n]] = True  # real gt anywhere, not only first
  return cost, gt_mask


CASES = [  # (queries, num_gt, real gt per image)
    (7, 4, (4, 2, 0)),
    (5, 9, (9, 5, 3)),  # G > Q: all real, exactly Q real, fewer real than Q
    (1, 3, (3, 1, 0)),
    (6, 6, (6, 3, 1)),
    (1, 1, (1, 0)),
    (30, 12, (12, 7, 0, 1)),
    (8, 20, (20, 11, 8, 2)),
]


@pytest.mark.parametrize("queries,num_gt,reals", CASES)
@pytest.mark.parametrize("integer", [False, True])
def test_optimal_on_the_real_columns(queries, num_gt, reals, integer):
  cost, gt_mask = _case(queries * 100 + num_gt, len(reals), queries, num_gt, reals, integer)
  m = match(cost, gt_mask)
  assert m.query_index.shape == (len(reals), num_gt) and m.gt_index.shape == (len(reals),
                                                                              queries)
  _check_valid(m, gt_mask)
  for b in range(len(reals)):
    np.testing.assert_allclose(_real_cost(m, cost, b), _scipy_cost(cost, gt_mask, b),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries,num_gt", [(7, 4), (4, 9), (10, 10)])
def test_padded_cost_values_do_not_matter(queries, num_gt):
  cost, gt_mask = _case(3, 4, queries, num_gt, (num_gt - 1, 2, 1, 3))
  base = match(cost, gt_mask)
  rng = np.random.default_rng(4)
  for pad_values in (-1e9, 1e9, np.nan, -np.inf, rng.normal(size=cost.shape) * 100):
    padded = np.where(gt_mask[:, None, :], cost, pad_values).astype(np.float32)
    m = match(padded, gt_mask)
    _check_valid(m, gt_mask)
    for b in range(len(cost)):
      np.testing.assert_allclose(_real_cost(m, cost, b), _real_cost(base, cost, b), rtol=1e-5,
                                 atol=1e-5)
      np.testing.assert_allclose(_real_cost(m, cost, b), _scipy_cost(cost, gt_mask, b),
                                 rtol=1e-5, atol=1e-5)


def test_non_finite_real_costs():
  cost = np.array([[[0.0, 5.0, np.nan],
                    [1.0, np.inf, 2.0],
                    [-np.inf, 3.0, 4.0],
                    [7.0, 8.0, 9.0]]], np.float32)
  m = match(cost, np.ones((1, 3), bool))
  _check_valid(m, np.ones((1, 3), bool))
  # -inf is taken; NaN / +inf avoided: q2-g0, q0-g1 (5), q1-g2 (2).
  np.testing.assert_array_equal(m.query_index, [[2, 0, 1]])
  np.testing.assert_array_equal(m.gt_index, [[1, 2, 0, -1]])
  everything_bad = np.full((2, 3, 4), np.nan, np.float32)
  everything_bad[1] = np.inf
  gt_mask = np.array([[True, True, False, True], [True, False, True, True]])
  _check_valid(match(everything_bad, gt_mask), gt_mask)
  huge = np.array([[[3e38, -3e38], [1.0, 2.0]]], np.float32)
  m = match(huge, np.ones((1, 2), bool))
  np.testing.assert_array_equal(m.query_index, [[1, 0]])


def test_no_real_gt_and_empty_shapes():
  cost, _ = _case(5, 2, 6, 4, (0, 0))
  m = match(cost, np.zeros((2, 4), bool))
  np.testing.assert_array_equal(m.matched, False)
  np.testing.assert_array_equal(m.gt_index, -1)
  np.testing.assert_array_equal(m.query_index, 0)
  for queries, num_gt in ((0, 3), (5, 0)):
    m = match(np.zeros((2, queries, num_gt), np.float32), np.ones((2, num_gt), bool))
    assert m.query_index.shape == (2, num_gt) and m.matched.shape == (2, num_gt)
    assert m.gt_index.shape == (2, queries) and (np.asarray(m.gt_index) == -1).all()
    assert not np.asarray(m.matched).any()


def test_batch_equals_single_images_and_no_gradient():
  cost, gt_mask = _case(6, 3, 12, 5, (5, 3, 4))
  batched = match(cost, gt_mask)
  for b in range(3):
    single = hungarian_match(cost[b:b + 1], gt_mask[b:b + 1])
    for got, expected in zip(batched, single):
      np.testing.assert_array_equal(got[b:b + 1], expected)

  def loss(c):
    m = hungarian_match(c, gt_mask)
    picked = jnp.take_along_axis(c, m.query_index[:, None, :], axis=1)[:, 0]
    return jnp.sum(jnp.where(m.matched, picked, 0.0))

  grad = jax.jit(jax.grad(loss))(jnp.asarray(cost))
  assert np.isfinite(grad).all() and set(np.unique(grad)) <= {0.0, 1.0}
  assert np.asarray(grad).sum() == 12  # only through the gather, not the matching


def test_bfloat16_costs():
  cost, gt_mask = _case(7, 2, 9, 4, (4, 2))
  m = match(jnp.asarray(cost, jnp.bfloat16), gt_mask)
  _check_valid(m, gt_mask)
  rounded = np.asarray(jnp.asarray(cost, jnp.bfloat16), np.float32)
  for b in range(2):
    np.testing.assert_allclose(_real_cost(m, rounded, b), _scipy_cost(rounded, gt_mask, b),
                               rtol=1e-5, atol=1e-5)


@functools.cache
def _bad_inputs():
  return np.zeros((2, 5, 3), np.float32), np.ones((2, 3), bool)


def test_bad_inputs_name_the_argument():
  cost, gt_mask = _bad_inputs()
  for bad in (cost[0], cost[..., None], cost.astype(np.int32)):
    with pytest.raises(ValueError, match="cost must be"):
      hungarian_match(bad, gt_mask)
  for bad in (gt_mask[0], gt_mask[:, :2], gt_mask.astype(np.int32), gt_mask[:1]):
    with pytest.raises(ValueError, match="gt_mask must be"):
      hungarian_match(cost, bad)
