"""The fast paths of the ranking losses give what the plain methods give.

* the grid lookup of ``count_at_or_below`` equals ``searchsorted`` (ties, clusters that need its
  binary-search fallback, values at and next to the thresholds, non-finite queries);
* the two-level compaction equals ``jnp.nonzero``;
* without ``max_positives`` under ``jit`` (slots = N) the losses equal the bounded call, through
  the few-positives branch and through the many-positives branch (the sorted positives chunk by
  chunk), values, gradients, per-positive errors and aLRP's localisation part alike;
* the chunked windows equal the float64 reference on edge inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank import losses
from jaxrank.losses import _ramp, _shared
from jaxrank.losses._common import positive_indices

import np_reference as ref

#: The loss every fast-path test runs in the default suite; the others run with ``-m slow``
#: (each case compiles several programs: the whole grid takes ~20 min of one CPU core).
DEFAULT_LOSS = "rank_sort"


def losses_slow_except(default=DEFAULT_LOSS):
  """``LOSSES`` as parameters, all but ``default`` marked slow."""
  return [pytest.param(n, marks=() if n == default else pytest.mark.slow) for n in LOSSES]


def _searchsorted(values, queries):
  return np.asarray(jax.jit(lambda v, x: jnp.searchsorted(v, x, side="right",
                                                          method="scan_unrolled"))(values, queries))


def _sorted_cases():
  rng = np.random.default_rng(0)
  cases = {}
  for n in (1, 2, 7, 2000):
    cases[f"normal{n}"] = np.sort(rng.normal(size=n))
    cases[f"ties{n}"] = np.sort(np.round(rng.normal(size=n) * 4) / 4)
    outlier = np.sort(rng.normal(size=n))
    outlier[-1] = 1e4  # squeezes every other value into one grid cell: binary search
    cases[f"outlier{n}"] = np.sort(outlier)
    cases[f"equal{n}"] = np.zeros(n)
  clustered = np.sort(np.concatenate([rng.normal(size=50), 3.0 + 1e-6 * np.arange(20)]))
  cases["cluster"] = clustered
  cases["huge"] = np.sort(rng.normal(size=300) * 1e4 + 1e4)
  return {k: v.astype(np.float32) for k, v in cases.items()}


@pytest.mark.parametrize("name,values", list(_sorted_cases().items()))
def test_count_at_or_below_equals_searchsorted(name, values):
  rng = np.random.default_rng(1)
  span = float(np.abs(values).max()) + 1.0
  queries = np.concatenate([
      rng.uniform(-1.5 * span, 1.5 * span, size=3000),
      values, np.nextafter(values, np.inf), np.nextafter(values, -np.inf),
      [np.inf, -np.inf, 0.0, 3e38, -3e38],
  ]).astype(np.float32)
  got = np.asarray(jax.jit(_ramp.count_at_or_below)(values, queries))
  np.testing.assert_array_equal(got, _searchsorted(values, queries))
  nan = np.asarray(jax.jit(_ramp.count_at_or_below)(values, np.full(4, np.nan, np.float32)))
  assert np.all((nan >= 0) & (nan <= values.size))  # any count, but a valid index


@pytest.mark.parametrize("n", [1, 129, 5000] + [pytest.param(n, marks=pytest.mark.slow)
                                                for n in (127, 128, 1000)])
@pytest.mark.parametrize("fraction", [0.0, 0.005, 0.3, 1.0])
@pytest.mark.parametrize("slots", [1, 8, 200, None])
def test_positive_indices_equals_nonzero(n, fraction, slots):
  slots = n if slots is None else slots
  mask = np.random.default_rng(n).random(n) < fraction
  index, count = jax.jit(positive_indices, static_argnums=1)(jnp.asarray(mask), slots)
  expected = np.nonzero(mask)[0][:slots]
  expected = np.concatenate([expected, np.zeros(slots - expected.size, int)])
  assert int(count) == mask.sum()
  np.testing.assert_array_equal(index, expected)


LOSSES = {
    "ap": (losses.ap_loss, 1.0),
    "rank_sort": (losses.rank_sort_loss, 0.5),
    "bucketed_ap": (losses.bucketed_ap_loss, 1.0),
    "bucketed_rank_sort": (losses.bucketed_rank_sort_loss, 0.5),
    "alrp": (lambda x, y, **kw: losses.alrp_loss(x, y, jnp.full_like(x, 0.5), **kw)[0], 1.0),
}


def make_inputs(seed, n, p, *, quantise=None, below=False):
  rng = np.random.default_rng(seed)
  logits = rng.normal(-1.0, 1.5, size=n).astype(np.float32)
  targets = np.zeros(n, np.float32)
  targets[rng.random(n) < 0.1] = -1.0
  chosen = rng.choice(n, size=p, replace=False)
  targets[chosen] = rng.uniform(0.05, 1.0, size=p)
  logits[chosen] = rng.normal(0.5, 1.5, size=p)
  if below:  # every negative below every window
    logits = np.where(targets > 0, logits, logits.min() - 10.0 - rng.random(n))
  if quantise:
    logits = np.round(logits / quantise) * quantise
  return logits.astype(np.float32), targets


def value_and_grad(name, max_positives):
  fn, _ = LOSSES[name]
  kw = {} if max_positives is None else {"max_positives": max_positives}
  return jax.jit(jax.value_and_grad(lambda x, y: fn(x, y, **kw)))


@pytest.fixture
def small_chunks(monkeypatch):
  """Makes the many-positives branch and its chunked windows run at test sizes."""
  monkeypatch.setattr(_shared, "FEW_POSITIVES", 8)
  monkeypatch.setattr(_ramp, "SINGLE_MAX", 16)
  monkeypatch.setattr(_ramp, "CHUNK", 8)


def _assert_same(got, expected):
  (value, grad), (ref_value, ref_grad) = got, expected
  np.testing.assert_allclose(float(value), float(ref_value), atol=2e-6, rtol=1e-5)
  scale = max(float(np.abs(ref_grad).max()), 1e-12)
  np.testing.assert_allclose(np.asarray(grad) / scale, np.asarray(ref_grad) / scale, atol=2e-6)


@pytest.mark.parametrize("name", losses_slow_except())
@pytest.mark.parametrize("p", [1, 5, 40])
def test_unbounded_under_jit_equals_bounded(name, p):
  logits, targets = make_inputs(p, 3000, p)
  bounded = value_and_grad(name, p)(logits, targets)
  _assert_same(value_and_grad(name, None)(logits, targets), bounded)  # few positives


@pytest.mark.parametrize("name", losses_slow_except())
@pytest.mark.parametrize("case", ["plain", "ties", "below", "single", "all_positive"])
def test_chunked_windows_equal_one_piece(name, case, small_chunks):
  p = {"single": 1, "all_positive": 0}.get(case, 37)
  logits, targets = make_inputs(3, 600, max(p, 1), quantise=0.25 if case == "ties" else None,
                                below=case == "below")
  if case == "all_positive":
    targets = np.random.default_rng(4).uniform(0.05, 1.0, size=40).astype(np.float32)
    logits = logits[:40]
  count = int((targets > 0).sum())
  one_piece = value_and_grad(name, count)(logits, targets)  # count <= SINGLE_MAX: one piece
  for slots in (None, 64):  # slots = N (many positives: chunks) and a bound above SINGLE_MAX
    _assert_same(value_and_grad(name, slots)(logits, targets), one_piece)


def _stream_inputs(case):
  """Inputs for the many-positives branch under :func:`small_chunks` (37 positives: 5 chunks of
  8, the last one partial; or every entry positive)."""
  logits, targets = make_inputs(3, 600, 37, quantise=0.25 if case == "ties" else None)
  if case == "all_positive":
    targets = np.random.default_rng(4).uniform(0.05, 1.0, size=40).astype(np.float32)
    logits = logits[:40]
  return logits, targets


@pytest.mark.parametrize("name", losses_slow_except())
@pytest.mark.parametrize("case", ["plain", "ties", "all_positive"])
def test_many_positives_errors_equal_bounded(name, case, small_chunks):
  """``ranking_errors`` (ranking and sorting errors laid out over the entries) through the
  many-positives branch."""
  logits, targets = _stream_inputs(case)
  count = int((targets > 0).sum())
  errors = {slots: jax.jit(lambda x, y, slots=slots: losses.ranking_errors(
      x, y, loss=name, max_positives=slots))(logits, targets) for slots in (count, None)}
  for got, expected in zip(errors[None], errors[count]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-6, rtol=1e-5)
  assert np.asarray(errors[None].positive).sum() == count


@pytest.mark.slow
@pytest.mark.parametrize("case", ["plain", "all_positive"])
def test_many_positives_alrp_localisation_equals_bounded(case, small_chunks):
  """aLRP's ``loc_loss`` and its gradient w.r.t. ``loc_errors`` (the per-positive weights carried
  from chunk to chunk) through the many-positives branch."""
  logits, targets = _stream_inputs(case)
  loc = np.random.default_rng(7).uniform(0.0, 2.0, size=logits.shape).astype(np.float32)
  count = int((targets > 0).sum())

  def loc_loss(slots):
    kw = {} if slots is None else {"max_positives": slots}
    return jax.jit(jax.value_and_grad(
        lambda e, x, y: losses.alrp_loss(x, y, e, **kw)[1]))(loc, logits, targets)

  _assert_same(loc_loss(None), loc_loss(count))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["plain", "ties"])
def test_many_positives_unit_step_equals_bounded(case, small_chunks):
  """RS at ``delta = 0`` (the unit step) through the many-positives branch, where ``rank⁺``
  comes from the windows rather than from the positive-positive sums."""
  logits, targets = _stream_inputs(case)
  count = int((targets > 0).sum())

  def run(slots):
    kw = {} if slots is None else {"max_positives": slots}
    return jax.jit(jax.value_and_grad(
        lambda x, y: losses.rank_sort_loss(x, y, delta=0.0, **kw)))(logits, targets)

  _assert_same(run(None), run(count))


def _reference(name, logits, targets, delta):
  if name == "ap":
    return ref.ap_loss(logits, targets, delta)
  if name == "alrp":
    cls_loss, _, grad, _ = ref.alrp_loss(logits, targets, np.full(logits.shape, 0.5), delta)
    return cls_loss, grad
  if name == "rank_sort":
    ranking, sorting, grad = ref.rank_sort_loss(logits, targets, delta)
  else:
    ranking, sorting, grad = ref.bucketed_loss(logits, targets, delta,
                                               sorting=name == "bucketed_rank_sort")
  return ranking + sorting, grad


@pytest.mark.parametrize("name", losses_slow_except())
@pytest.mark.parametrize("chunked", [False, True])
def test_negatives_at_window_edges_match_reference(name, chunked, monkeypatch):
  """Negatives exactly at ``s_i ± δ`` and next to them: the bucket boundaries."""
  if chunked:
    monkeypatch.setattr(_ramp, "SINGLE_MAX", 16)
    monkeypatch.setattr(_ramp, "CHUNK", 8)
  _, delta = LOSSES[name]
  rng = np.random.default_rng(5)
  pos = np.round(rng.normal(size=30), 2).astype(np.float32)
  edges = np.concatenate([pos - delta, pos + delta]).astype(np.float32)
  neg = np.concatenate([edges, np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf),
                        rng.normal(size=200).astype(np.float32)])
  logits = np.concatenate([pos, neg]).astype(np.float32)
  targets = np.concatenate([rng.uniform(0.05, 1.0, size=pos.size),
                            np.zeros(neg.size)]).astype(np.float32)
  value, grad = value_and_grad(name, 32 if chunked else None)(logits, targets)
  ref_value, ref_grad = _reference(name, logits, targets, delta)
  assert abs(float(value) - ref_value) <= 2e-5
  assert np.abs(np.asarray(grad, np.float64) - ref_grad).max() <= 1e-4 * np.abs(ref_grad).max()


@pytest.mark.parametrize("name", losses_slow_except())
@pytest.mark.parametrize("bad", [np.nan, pytest.param(np.inf, marks=pytest.mark.slow),
                                 pytest.param(-np.inf, marks=pytest.mark.slow)])
def test_non_finite_logits_on_the_fast_paths(name, bad, small_chunks):
  logits, targets = make_inputs(6, 400, 20)
  negative = int(np.nonzero(targets == 0)[0][0])
  for slots in (20, None):
    value, grad = value_and_grad(name, slots)(_with(logits, negative, bad), targets)
    assert np.isnan(float(value)) and np.all(np.isnan(grad))
    ignored = targets.copy()
    ignored[negative] = -1.0
    value, grad = value_and_grad(name, slots)(_with(logits, negative, bad), ignored)
    expected = value_and_grad(name, slots)(logits, ignored)
    _assert_same((value, grad), expected)
    assert float(grad[negative]) == 0.0


def _with(array, index, value):
  out = array.copy()
  out[index] = value
  return out


@pytest.mark.parametrize("name", losses_slow_except())
def test_no_positives_on_the_fast_paths(name, small_chunks):
  logits, targets = make_inputs(8, 300, 1)
  targets = np.where(targets > 0, 0.0, targets).astype(np.float32)
  for slots in (4, None):
    value, grad = value_and_grad(name, slots)(logits, targets)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


def _plan_bytes(fn, n, max_positives):
  kw = {} if max_positives is None else {"max_positives": max_positives}
  shape = jax.ShapeDtypeStruct((n,), jnp.float32)
  compiled = jax.jit(jax.value_and_grad(lambda x, y: fn(x, y, **kw))).lower(shape, shape).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip("no memory analysis on this backend")
  return (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
          + analysis.output_size_in_bytes)


@pytest.mark.parametrize("name", [n for n in losses_slow_except() if n.values[0] in ("rank_sort",
                                                                                     "ap")])
def test_many_positives_branch_memory_within_twice_the_bounded(name):
  """Without ``max_positives`` under ``jit`` XLA's buffer plan covers the many-positives branch;
  it keeps a few arrays of the entries' size, not every per-positive result (issue 14: within 2x
  of the bounded call's; about 1.6x (AP) and 1.8x (RS) at N = 2e7, compiled only)."""
  fn, _ = LOSSES[name]
  n = 2_000_000
  assert _plan_bytes(fn, n, None) <= 2.0 * _plan_bytes(fn, n, 1000)
