"""Exact sums of the smoothed step against a set of positives, in O((N + P) log P) (internal).

For positives with logits ``s_i`` and a half-width ``δ``, the 2P thresholds ``s_i ± δ`` cut the
real line into 2P + 1 buckets. Inside a bucket every ``H_δ(x - s_i)`` is either constant or the
same linear function of ``x``, so

* ``window_sums``: ``Σ_j w_j H_δ(x_j - s_i)`` for every positive ``i`` needs only, per bucket,
  ``Σ w_j`` and ``Σ w_j (x_j - bucket start)``: one ``searchsorted`` of the points among the
  thresholds and a ``segment_sum``. Buckets fully above ``s_i + δ`` count with weight 1 (a suffix
  sum); buckets inside ``[s_i - δ, s_i + δ)`` are summed with a segment tree whose nodes store
  offsets from their own left edge, so large logits or many points never cancel in float32.
* ``ramp_values``: ``F(x) = Σ_i c_i H_δ(x - s_i)`` at many points ``x`` is, inside bucket ``b``,
  ``F(t_b) + slope_b (x - t_b)``; both coefficients come from prefix sums and a segment tree over
  the sorted positives, and each point then costs one gather.

No array of size P x N is ever formed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrank.losses._common import positive_indices

Array = jax.Array


def searchsorted(sorted_values, queries, side: str):
  """``jnp.searchsorted`` with the method that is fastest for many queries.

  ``scan_unrolled`` (a branch-free binary search, O(log P) gathers per query) beats the
  sort-based method on CPU and GPU by a wide margin for N >> P; ``compare_all`` would build
  a P x N array.
  """
  return jnp.searchsorted(sorted_values, queries, side=side,
                          method="scan_unrolled").astype(jnp.int32)


#: Uniform-grid lookup of :func:`count_at_or_below`: cells per distinct value, at most
#: ``GRID_MAX_CELLS``, and the values a cell may hold for the fused path (else binary search).
GRID_CELLS_PER_VALUE = 16
GRID_MAX_CELLS = 1 << 18
GRID_STEPS = 3


def count_at_or_below(sorted_values, x):
  """``searchsorted(sorted_values, x, "right")`` for many queries ``x``, exactly.

  A uniform grid over the distinct values' range maps ``x`` to a cell (one multiply); a small
  table gives the number of distinct values in the cells below, and at most ``GRID_STEPS``
  comparisons with the values inside the cell finish the count. ``cell`` is monotone in ``x``
  (every float op in it is), so a value in a lower cell is ``< x`` and one in a higher cell
  is ``> x``: the count is exact. When a cell holds more distinct values than ``GRID_STEPS``
  (values clustered far below the grid's resolution), a binary search inside the cells
  replaces the fused scan, one pass per halving.
  """
  num = sorted_values.shape[0]
  v = sorted_values
  distinct = jnp.concatenate([jnp.ones(1, bool), v[1:] != v[:-1]])
  run, num_unique = positive_indices(distinct, num)  # where each run of equal values starts
  slot = jnp.arange(num, dtype=jnp.int32)
  unique = jnp.where(slot < num_unique, v[run], jnp.inf)  # distinct values first, then +inf
  lo, hi = unique[0], unique[jnp.maximum(num_unique - 1, 0)]
  # count[m]: the values <= the m-th distinct one, i.e. the answer when m distinct are <= x
  count = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.where(slot[1:] < num_unique, run[1:], num),
                           jnp.full(1, num, jnp.int32)])
  cells = min(GRID_MAX_CELLS, _pow2(GRID_CELLS_PER_VALUE * num))
  scale = jnp.minimum(cells / jnp.maximum(hi - lo, 0.0), 3e38)

  def cell_of(t):
    c = jnp.clip(jnp.floor((t - lo) * scale), 0, cells - 1).astype(jnp.int32)
    return jnp.clip(c, 0, cells - 1)  # NaN converts to anything; keep the index in range

  unique_cell = jnp.where(slot < num_unique - 1, cell_of(unique), cells)  # hi and +inf: none
  # start[c]: distinct values in the cells below c
  start = jnp.cumsum(jnp.zeros(cells + 1, jnp.int32).at[unique_cell + 1].add(1, mode="drop"))
  most = jnp.max(start[1:] - start[:-1])  # distinct values in the fullest cell

  def finish(x, m):
    return jnp.where(x < lo, 0, jnp.where(x >= hi, num, count[m]))

  def linear(x):  # one fused pass
    c = cell_of(x)
    m, end = start[c], start[c + 1]
    for _ in range(GRID_STEPS):
      m = m + ((m < end) & (unique[jnp.minimum(m, num - 1)] <= x))
    return finish(x, m)

  def binary(x):  # a pass per halving of the fullest cell; one int32 carry of memory
    steps = jnp.ceil(jnp.log2(most.astype(jnp.float32) + 1.0)).astype(jnp.int32) + 1

    def lift(k, m):  # m: the values of x's cell known to be <= x, tried in halving steps
      step = jnp.left_shift(1, steps - 1 - k)
      end = start[cell_of(x) + 1]
      go = (m + step <= end) & (unique[jnp.clip(m + step - 1, 0, num - 1)] <= x)
      return jnp.where(go, m + step, m)

    return finish(x, lax.fori_loop(0, steps, lift, start[cell_of(x)]))

  return lax.cond(most <= GRID_STEPS, linear, binary, x)


class Thresholds(NamedTuple):
  """Sorted thresholds of the positives (ascending logits ``s``) and each window's buckets."""
  values: Array   # [2P] sorted ``s ± δ``
  lower: Array    # [P] ``s - δ``
  upper: Array    # [P] ``s + δ``
  first: Array    # [P] first bucket inside ``[s - δ, s + δ)``
  end: Array      # [P] first bucket at or above ``s + δ``
  delta: float


def make_thresholds(sorted_logits, delta: float) -> Thresholds:
  lower = sorted_logits - delta
  upper = sorted_logits + delta
  values = jnp.sort(jnp.concatenate([lower, upper]))
  first = searchsorted(values, lower, "left") + 1
  end = searchsorted(values, upper, "left") + 1
  return Thresholds(values, lower, upper, first, end, delta)


def bucketize(th: Thresholds, x):
  """Bucket ``b`` holds ``values[b-1] <= x < values[b]``; bucket 0 lies below every window."""
  return searchsorted(th.values, x, "right")


def _bucket_starts(th: Thresholds):
  return jnp.concatenate([th.values[:1], th.values])  # [2P + 1]; bucket 0 gets values[0]


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


class _Tree(NamedTuple):
  """Sum tree in heap layout: node k has children 2k and 2k+1; leaves at [size, 2·size)."""
  weight: Array
  moment: Array
  ref: Array
  left_anchored: bool


def _build_tree(weight, moment, ref, *, left_anchored: bool) -> _Tree:
  """Sum tree over leaves with (Σw, Σw·|x - ref|, ref).

  Left-anchored nodes keep ``ref`` = their leftmost leaf's ref and moments ``Σ w (x - ref)``;
  right-anchored nodes keep the rightmost ref and ``Σ w (ref - x)``. All moments are sums of
  non-negative terms. Built with one loop over the levels (small programs compile fast).
  """
  n = weight.shape[0]
  size = _pow2(n)
  pad = size - n
  weight = jnp.concatenate([jnp.zeros(size, jnp.float32), weight, jnp.zeros(pad, jnp.float32)])
  moment = jnp.concatenate([jnp.zeros(size, jnp.float32), moment, jnp.zeros(pad, jnp.float32)])
  ref = jnp.concatenate([jnp.broadcast_to(ref[:1], (size,)), ref,
                         jnp.broadcast_to(ref[-1:], (pad,))])

  def level(_, tree):
    w, m, r = tree
    wl, wr, ml, mr, rl, rr = w[0::2], w[1::2], m[0::2], m[1::2], r[0::2], r[1::2]
    if left_anchored:
      parent_m, parent_r = ml + mr + wr * (rr - rl), rl
    else:
      parent_m, parent_r = ml + mr + wl * (rr - rl), rr
    return (jnp.concatenate([wl + wr, w[size:]]), jnp.concatenate([parent_m, m[size:]]),
            jnp.concatenate([parent_r, r[size:]]))

  w, m, r = lax.fori_loop(0, size.bit_length() - 1, level, (weight, moment, ref))
  return _Tree(w, m, r, left_anchored)


def _query_tree(tree: _Tree, lo, hi, q):
  """``(Σ w, Σ w |x - q|)`` over leaves ``[lo, hi)``, for ``q`` on the anchored side of them."""
  size = tree.weight.shape[0] // 2

  def add(take, idx, total_w, total_m):
    idx = jnp.where(take, idx, 0)
    w, r = tree.weight[idx], tree.ref[idx]
    dist = (r - q) if tree.left_anchored else (q - r)
    total_w = total_w + jnp.where(take, w, 0.0)
    total_m = total_m + jnp.where(take, tree.moment[idx] + w * dist, 0.0)
    return total_w, total_m

  def level(_, carry):
    lo, hi, total_w, total_m = carry
    take = (lo < hi) & ((lo & 1) == 1)
    total_w, total_m = add(take, lo, total_w, total_m)
    lo = lo + take
    take = (lo < hi) & ((hi & 1) == 1)
    hi = hi - take
    total_w, total_m = add(take, hi, total_w, total_m)
    return lo >> 1, hi >> 1, total_w, total_m

  zero = jnp.zeros(q.shape, jnp.float32)
  _, _, total_w, total_m = lax.fori_loop(0, size.bit_length(), level,
                                         (lo + size, hi + size, zero, zero))
  return total_w, total_m


def window_sums(th: Thresholds, x, weight, bucket=None):
  """``Σ_j weight_j H_δ(x_j - s_i)`` for every positive ``i``: ``[P]``.

  ``bucket`` (from :func:`bucketize`) may be passed to reuse it. Points with weight 0 are
  ignored, so padding and masked points need only a zero weight.
  """
  if bucket is None:
    bucket = bucketize(th, x)
  num_buckets = th.values.shape[0] + 1
  weight = weight.astype(jnp.float32)
  total = jax.ops.segment_sum(weight, bucket, num_segments=num_buckets)
  moment = None
  if th.delta != 0:
    inside = (bucket > 0) & (bucket < num_buckets - 1)
    offset = jnp.where(inside, x - _bucket_starts(th)[bucket], 0.0)
    moment = jax.ops.segment_sum(weight * offset, bucket, num_segments=num_buckets)
  return _sums_from_buckets(th, total, moment)


def locate(th: Thresholds, x, mask):
  """Bucket of every point of ``x`` where ``mask`` holds, for :func:`located_window_sums` and
  :func:`located_ramp_values`: ``[N]`` int32 in ``[1, 2P]``, or ``2P + 1`` for points that are
  masked out or lie below every window (they add to no sum and get a zero value).

  The result is materialised: the grid lookup then runs as one parallel elementwise pass
  instead of inside the (serial) scatter loops that consume it.
  """
  bucket = count_at_or_below(th.values, x)
  index = jnp.where(mask & (bucket > 0), bucket, th.values.shape[0] + 1)
  return lax.optimization_barrier(index)


def scatter_sum(values, index, num_segments):
  """``segment_sum`` where ``index == num_segments`` marks entries that add to nothing.

  On CPU they go to an extra segment that is thrown away (a branch-free scatter loop is
  faster); on accelerators they are dropped as out of range, so that entries that cannot
  matter never contend for one address in the scatter's atomics.
  """
  if jax.default_backend() == "cpu":
    return jax.ops.segment_sum(values, index, num_segments=num_segments + 1)[:num_segments]
  return jax.ops.segment_sum(values, index, num_segments=num_segments)


def located_window_sums(th: Thresholds, x, index, weight=None, where=None):
  """``Σ_j weight_j H_δ(x_j - s_i)`` (weight 1 by default) over the points that :func:`locate`
  kept (and ``where`` holds, if given), for every positive."""
  num_buckets = th.values.shape[0] + 1
  kept = index < num_buckets
  if where is not None:
    kept = kept & where
  weight = kept.astype(jnp.float32) if weight is None else jnp.where(kept, weight, 0.0)
  total = scatter_sum(weight, index, num_buckets)
  moment = None
  if th.delta != 0:
    inside = kept & (index < num_buckets - 1)
    start = _bucket_starts(th)[jnp.minimum(index, num_buckets - 1)]
    moment = scatter_sum(jnp.where(inside, weight * (x - start), 0.0), index, num_buckets)
  return _sums_from_buckets(th, total, moment)


def located_counts(th: Thresholds, x, index, second):
  """``Σ_j H_δ(x_j - s_i)`` for every positive over the points that :func:`locate` kept, in two
  groups: ``(sums where second is False, sums where it is True)``, from one scatter of the
  points. (Everything per point is computed from ``index``: XLA then keeps it inside a loop
  over chunks instead of hoisting an array of the points out of it.)"""
  num_buckets = th.values.shape[0] + 1
  kept = index < num_buckets
  segment = jnp.where(kept, jnp.where(second, index + num_buckets, index), 2 * num_buckets)
  total = scatter_sum(kept.astype(jnp.float32), segment, 2 * num_buckets).reshape(2, -1)
  moment = (None, None)
  if th.delta != 0:
    inside = kept & (index < num_buckets - 1)
    start = _bucket_starts(th)[jnp.minimum(index, num_buckets - 1)]
    moment = scatter_sum(jnp.where(inside, x - start, 0.0), segment, 2 * num_buckets)
    moment = moment.reshape(2, -1)
  return tuple(_sums_from_buckets(th, total[g], moment[g]) for g in range(2))


def _sums_from_buckets(th: Thresholds, total, moment):
  """Window sums from each bucket's total weight and weighted offset from its start."""
  suffix = jnp.concatenate([jnp.cumsum(total[::-1])[::-1], jnp.zeros(1, jnp.float32)])
  full = suffix[th.end]
  if th.delta == 0:
    return full
  tree = _build_tree(total, moment, _bucket_starts(th), left_anchored=True)
  _, partial = _query_tree(tree, th.first, th.end, th.lower)
  return full + partial / (2.0 * th.delta)


def computed_once(needed, fn, like):
  """``fn()`` if ``needed``, else zeros shaped like ``like`` (a pytree), as a conditional.

  For small tables that many points then gather from: XLA fuses cheap producers into their
  consumers, and a table made by gathers (a binary search) would be recomputed for every point
  that reads it; a conditional's result is always materialised. Where ``needed`` is false the
  table must be all zeros anyway.
  """
  zeros = lambda: jax.tree.map(jnp.zeros_like, like)
  return lax.cond(needed, fn, zeros)


def _ramp_tables(th: Thresholds, coeff):
  """Per bucket, ``F`` at the bucket's start and its slope inside (``F`` as in ramp_values)."""
  coeff = coeff.astype(jnp.float32)
  starts = _bucket_starts(th)
  prefix = jnp.concatenate([jnp.zeros(1, jnp.float32), jnp.cumsum(coeff)])
  passed = searchsorted(th.upper, starts, "right")    # positives with s + δ <= start
  if th.delta == 0:
    return prefix[passed].at[0].set(0.0), None, starts
  entered = searchsorted(th.lower, starts, "right")   # positives with s - δ <= start
  tree = _build_tree(coeff, jnp.zeros_like(coeff), th.lower, left_anchored=False)
  active, moment = _query_tree(tree, passed, entered, starts)
  scale = 1.0 / (2.0 * th.delta)
  at_start = (prefix[passed] + moment * scale).at[0].set(0.0)
  slope = (active * scale).at[0].set(0.0)
  return at_start, slope, starts


def ramp_values(th: Thresholds, coeff, x, bucket=None):
  """``F(x) = Σ_i coeff_i H_δ(x - s_i)`` at every point ``x`` (coeff >= 0, in ascending-s order)."""
  if bucket is None:
    bucket = bucketize(th, x)
  at_start, slope, starts = _ramp_tables(th, coeff)
  if slope is None:
    return at_start[bucket]
  return at_start[bucket] + slope[bucket] * (x - starts[bucket])


def located_ramp_values(th: Thresholds, coeff, x, index):
  """:func:`ramp_values` at the points that :func:`locate` kept; 0 at the others."""
  coeff = coeff.astype(jnp.float32)
  starts = _bucket_starts(th)
  at_start, slope = computed_once(jnp.any(coeff != 0), lambda: _ramp_tables(th, coeff)[:2],
                                  (starts, None if th.delta == 0 else starts))
  kept = index < at_start.shape[0]
  b = jnp.minimum(index, at_start.shape[0] - 1)
  if slope is None:
    return jnp.where(kept, at_start[b], 0.0)
  return jnp.where(kept, at_start[b] + slope[b] * (x - starts[b]), 0.0)


#: Positive slots whose windows are handled in one piece; more slots (a larger bound, or no
#: ``max_positives`` under ``jit`` for the bucketed losses) run in chunks of ``CHUNK`` over the
#: real positives only, one pass over the points per chunk, with O(points + slots) memory.
#: ``CHUNK`` is also the chunk of the sorted positives in the many-positives branch of AP, aLRP
#: and RS (``_shared.over_chunks``).
SINGLE_MAX = 1 << 16
CHUNK = 1 << 13


class Windows(NamedTuple):
  """The windows ``[s_i - δ, s_i + δ)`` of ascending positive logits, whole or in chunks."""
  logits: Array              # [S'] ascending; padded with the last logit to a multiple of chunk
  count: Array               # [] real positives (a prefix of the slots)
  slots: int                 # S, the length of the results
  chunk: int
  delta: float
  whole: Thresholds | None   # the thresholds when there is one chunk


def windows(sorted_logits, count, delta: float) -> Windows:
  slots = sorted_logits.shape[0]
  if slots <= SINGLE_MAX:
    return Windows(sorted_logits, count, slots, slots, delta, make_thresholds(sorted_logits, delta))
  pad = -slots % CHUNK
  logits = jnp.concatenate([sorted_logits, jnp.broadcast_to(sorted_logits[-1:], (pad,))])
  return Windows(logits, count, slots, CHUNK, delta, None)


def _over_chunks(w: Windows, body, init):
  """``body(start, thresholds, carry)`` over the chunks that hold real positives."""
  num = (jnp.minimum(w.count, w.slots) + w.chunk - 1) // w.chunk

  def step(c, carry):
    start = c * w.chunk
    th = make_thresholds(lax.dynamic_slice_in_dim(w.logits, start, w.chunk), w.delta)
    return body(start, th, carry)

  return lax.fori_loop(0, num, step, init)


def _padded(w: Windows, values):
  pad = w.logits.shape[0] - values.shape[0]
  return jnp.concatenate([values, jnp.zeros(pad, values.dtype)]) if pad else values


def sums_over_points(w: Windows, x, mask, weight=None):
  """``Σ_j weight_j H_δ(x_j - s_i)`` over the points where ``mask`` holds, for every slot ``i``.

  Returns ``(sums [S], index)``; ``index`` (from :func:`locate`) can be reused by
  :func:`ramp_at_points` for the same points and mask when the windows are whole, else None.
  """
  if w.whole is not None:
    index = locate(w.whole, x, mask)
    return located_window_sums(w.whole, x, index, weight), index

  def body(start, th, sums):
    part = located_window_sums(th, x, locate(th, x, mask), weight)
    return lax.dynamic_update_slice_in_dim(sums, part, start, 0)

  sums = _over_chunks(w, body, jnp.zeros(w.logits.shape[0], jnp.float32))
  return sums[:w.slots], None


def ramp_at_points(w: Windows, coeff, x, mask, index=None):
  """``F(x) = Σ_i coeff_i H_δ(x - s_i)`` where ``mask`` holds, 0 elsewhere (coeff >= 0, [S])."""
  if w.whole is not None:
    index = locate(w.whole, x, mask) if index is None else index
    return located_ramp_values(w.whole, coeff, x, index)
  coeff = _padded(w, coeff.astype(jnp.float32))

  def body(start, th, total):
    part = lax.dynamic_slice_in_dim(coeff, start, w.chunk)
    return total + located_ramp_values(th, part, x, locate(th, x, mask))

  return _over_chunks(w, body, jnp.zeros(x.shape, jnp.float32))


def sums_over_slots(w: Windows, points, weight):
  """:func:`sums_over_points` for a few points (slots or buckets): ``[S]``; zero weights are
  ignored."""
  if w.whole is not None:
    return window_sums(w.whole, points, weight)
  weight = weight.astype(jnp.float32)
  return sums_over_points(w, points, weight != 0, weight)[0]


def ramp_at_slots(w: Windows, coeff, points):
  """:func:`ramp_at_points` at every one of a few points."""
  if w.whole is not None:
    return ramp_values(w.whole, coeff, points)
  return ramp_at_points(w, coeff, points, jnp.ones(points.shape, bool))
