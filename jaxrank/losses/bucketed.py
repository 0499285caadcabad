"""Bucketed AP and Bucketed Rank & Sort Loss (Yavuz et al., ECCV 2024), as published.

The published bucketed losses replace each run of consecutive negatives between two positives
(in descending-logit order, down to ``τ = min_P s - δ``) by one prototype at the run's mean
logit ``μ_b`` with weight ``n_b``:

    N_FP(i) ≈ Σ_b n_b H_δ(μ_b - s_i),

and every member of a bucket receives the gradient of its prototype divided by ``n_b``.

**This is an approximation** of the exact losses whenever ``δ > 0`` and a bucket straddles a
kink of ``H_δ`` (measured: several percent gradient error); at ``δ = 0`` it is exact. Use these
functions to reproduce the bucketed paper; prefer the exact :func:`jaxrank.losses.rank_sort_loss`
and :func:`jaxrank.losses.ap_loss`, which are at least as fast here. Also note:

* Bucketed AP is *not* a bucketed AP Loss: it is the RS ranking part only (self term ``H(0)``,
  no interpolation).
* Ties between a positive and negatives are broken with the negatives first (stable), which
  makes ``δ = 0`` match the exact loss; the published unstable sort breaks them arbitrarily.
* Where the published bucketed AP crashes (no relevant negative) the loss here is 0 with zero
  gradient, and no positive gives 0.

Cost: O((N + P) log P) time (no sort of the N logits: a negative's bucket is the number of
positives above it) plus O(P²) for the sorting part of bucketed RS.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from jaxrank.losses._common import Flat, Positives
from jaxrank.losses._ramp import (
  computed_once,
  count_at_or_below,
  ramp_at_slots,
  scatter_sum,
  sums_over_slots,
  windows,
)
from jaxrank.losses._shared import (
  MAX_IOU_TARGET,
  RS_EPS,
  LossParts,
  ranking_impl,
  sorting_part,
  static_options,
  without_errors,
)
from jaxrank.losses._vjp import error_driven

__all__ = ["ERRORS", "bucketed_ap_loss", "bucketed_rank_sort_loss"]


def _buckets(flat: Flat, pos: Positives, delta: float):
  """Bucket index (``P + 1`` where irrelevant), size and mean logit of the negatives' runs."""
  tau = pos.logits[0] - delta
  count = pos.count
  at_or_below = jnp.minimum(count_at_or_below(pos.logits, flat.logits), count)
  num_buckets = pos.logits.shape[0] + 1
  relevant = flat.negative & (flat.logits >= tau)
  # bucket = positives strictly above; ties put negatives first
  index = lax.optimization_barrier(jnp.where(relevant, count - at_or_below, num_buckets))
  kept = index < num_buckets
  bucket = jnp.minimum(index, num_buckets - 1)
  b = jnp.arange(num_buckets)
  below = jnp.clip(count - 1 - b, 0, pos.logits.shape[0] - 1)
  ref = jnp.where(b < count, pos.logits[below], tau)  # the positive just below the bucket
  offset = jnp.where(kept, flat.logits - ref[bucket], 0.0)
  size = scatter_sum(kept.astype(jnp.float32), index, num_buckets)
  mean = ref + scatter_sum(offset, index, num_buckets) / jnp.maximum(size, 1.0)
  return index, size, mean


def _bucketed_body(flat: Flat, pos: Positives, n, delta: float, *, sorting: bool) -> LossParts:
  th = windows(pos.logits, pos.count, delta)
  index, size, mean = _buckets(flat, pos, delta)
  nfp = sums_over_slots(th, mean, size)
  if sorting:
    rank_plus, sorting_error, sorting_grad = sorting_part(pos, delta)
  else:
    rank_plus = sums_over_slots(th, pos.logits, pos.mask)
    sorting_error = sorting_grad = jnp.zeros_like(rank_plus)
  rank = jnp.where(pos.mask, rank_plus + nfp, 1.0)
  has_fp = pos.mask & (nfp > RS_EPS)
  ranking_error = jnp.where(pos.mask, nfp / rank, 0.0)
  coeff = jnp.where(has_fp, 1.0 / (rank * n), 0.0)
  # the bucket's total gradient / n_b
  per_member = computed_once(jnp.any(coeff != 0), lambda: ramp_at_slots(th, coeff, mean), mean)
  grad = jnp.where(index < size.shape[0], per_member[jnp.minimum(index, size.shape[0] - 1)], 0.0)
  grad = grad.at[pos.index].add(jnp.where(pos.mask, (sorting_grad - ranking_error) / n, 0.0))
  values = (jnp.sum(ranking_error) / n, jnp.sum(sorting_error) / n)
  return LossParts(values, grad, ranking_error, sorting_error)


_bap_impl = ranking_impl(functools.partial(_bucketed_body, sorting=False), name="bucketed_ap_loss")
_brs_impl = ranking_impl(functools.partial(_bucketed_body, sorting=True),
                         name="bucketed_rank_sort_loss", max_target=MAX_IOU_TARGET)

_bap = error_driven(without_errors(_bap_impl), 2)
_brs = error_driven(without_errors(_brs_impl), 2)

#: ``loss name: (impl, default delta, delta 0 allowed, largest target)`` for ``ranking_errors``.
ERRORS = {
    "bucketed_ap": (_bap_impl, 1.0, True, None),
    "bucketed_rank_sort": (_brs_impl, 0.5, True, MAX_IOU_TARGET),
}


def bucketed_ap_loss(logits, targets, *, delta: float = 1.0, where=None,
                     max_positives: int | None = None):
  r"""Bucketed AP Loss as published: the RS ranking error over bucket prototypes.

  .. math::
     \mathcal{L} = \frac{1}{|P|} \sum_{i \in P} \frac{\sum_b n_b H_\delta(\mu_b - s_i)}
                   {\sum_{k \in P} H_\delta(s_k - s_i) + \sum_b n_b H_\delta(\mu_b - s_i)}

  An approximation (see the module docstring). ``delta`` is 1.0 in the published ATSS head and
  0.5 in its PAA head. Arguments, return value and bad-input results as
  :func:`jaxrank.losses.ap_loss`; ``delta = 0`` is allowed.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxrank import losses
    >>> logits = jnp.array([2.0, 1.0, 0.5, -1.0])
    >>> targets = jnp.array([1.0, 0.0, 1.0, 0.0])
    >>> round(float(losses.bucketed_ap_loss(logits, targets)), 4)
    0.1667
  """
  static = static_options("bucketed_ap_loss", logits, targets, delta, max_positives,
                          allow_zero=True, where=where)
  return _bap(static, logits, targets, where)[0]


def bucketed_rank_sort_loss(logits, targets, *, delta: float = 0.5, where=None,
                            max_positives: int | None = None):
  r"""Bucketed Rank & Sort Loss as published: RS with ``N_FP`` over bucket prototypes.

  The sorting part is exactly that of :func:`jaxrank.losses.rank_sort_loss`; the ranking part
  uses ``N_FP(i) = Σ_b n_b H_δ(μ_b - s_i)``. An approximation at ``δ > 0``, exact at ``δ = 0``
  (see the module docstring). Arguments, return value and bad-input results (``targets > 1``:
  ValueError, or NaN under ``jit``) as :func:`jaxrank.losses.rank_sort_loss`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxrank import losses
    >>> logits = jnp.array([2.0, 1.0, 0.5, -1.0])
    >>> targets = jnp.array([0.6, 0.0, 0.9, 0.0])
    >>> round(float(losses.bucketed_rank_sort_loss(logits, targets)), 4)
    0.3
  """
  static = static_options("bucketed_rank_sort_loss", logits, targets, delta, max_positives,
                          allow_zero=True, where=where, max_target=MAX_IOU_TARGET)
  ranking, sorting = _brs(static, logits, targets, where)
  return ranking + sorting
