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

Array = jax.Array


def searchsorted(sorted_values, queries, side: str):
  """``jnp.searchsorted`` with the method that is fastest for many queries.

  ``scan_unrolled`` (a branch-free binary search, O(log P) gathers per query) beats the
  sort-based method on CPU and GPU by a wide margin for N >> P; ``compare_all`` would build
  a P x N array.
  """
  return jnp.searchsorted(sorted_values, queries, side=side,
                          method="scan_unrolled").astype(jnp.int32)


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
  suffix = jnp.concatenate([jnp.cumsum(total[::-1])[::-1], jnp.zeros(1, jnp.float32)])
  full = suffix[th.end]
  if th.delta == 0:
    return full
  starts = _bucket_starts(th)
  inside = (bucket > 0) & (bucket < num_buckets - 1)
  offset = jnp.where(inside, x - starts[bucket], 0.0)
  moment = jax.ops.segment_sum(weight * offset, bucket, num_segments=num_buckets)
  tree = _build_tree(total, moment, starts, left_anchored=True)
  _, partial = _query_tree(tree, th.first, th.end, th.lower)
  return full + partial / (2.0 * th.delta)


def ramp_values(th: Thresholds, coeff, x, bucket=None):
  """``F(x) = Σ_i coeff_i H_δ(x - s_i)`` at every point ``x`` (coeff >= 0, in ascending-s order)."""
  if bucket is None:
    bucket = bucketize(th, x)
  coeff = coeff.astype(jnp.float32)
  starts = _bucket_starts(th)
  prefix = jnp.concatenate([jnp.zeros(1, jnp.float32), jnp.cumsum(coeff)])
  passed = searchsorted(th.upper, starts, "right")    # positives with s + δ <= start
  if th.delta == 0:
    value = prefix[passed].at[0].set(0.0)
    return value[bucket]
  entered = searchsorted(th.lower, starts, "right")   # positives with s - δ <= start
  tree = _build_tree(coeff, jnp.zeros_like(coeff), th.lower, left_anchored=False)
  active, moment = _query_tree(tree, passed, entered, starts)
  scale = 1.0 / (2.0 * th.delta)
  at_start = (prefix[passed] + moment * scale).at[0].set(0.0)
  slope = (active * scale).at[0].set(0.0)
  return at_start[bucket] + slope[bucket] * (x - starts[bucket])
