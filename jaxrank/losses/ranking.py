"""AP Loss, aLRP Loss and Rank & Sort Loss: exact, with the published error-driven gradients.

All three rank every non-ignored entry of ``logits`` against every other (one ranking over all
images, levels and classes, as the published detectors flatten them). With ``H_δ(x) =
clip(x / 2δ + 1/2, 0, 1)`` and, for a positive ``i``,

* ``N_FP(i) = Σ_{j∈N} H_δ(s_j - s_i)`` (negatives scored above ``i``),
* ``rank⁺(i) = Σ_{k∈P} H_δ(s_k - s_i)`` (self term ``H(0)``; AP and aLRP use 1 instead),
* ``rank(i) = rank⁺(i) + N_FP(i)``,

each loss is a mean over positives of an error built from these sums. The sums over negatives
are computed exactly in O((N + P) log P) time and O(N + P) memory (see ``_ramp``): the published
code loops over positives, O(P·N). RS adds an O(P²) positive-positive part, computed in blocks.

Gradients are the published error-driven updates, attached by ``jax.custom_vjp``: targets and
localisation errors get no gradient, and only the first returned value carries one.

References:
  Chen et al., "Towards Accurate One-Stage Object Detection with AP-Loss", CVPR 2019.
  Oksuz et al., "A Ranking-based, Balanced Loss Function Unifying Classification and
  Localisation in Object Detection", NeurIPS 2020.
  Oksuz et al., "Rank & Sort Loss for Object Detection and Instance Segmentation", ICCV 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxrank.losses import _pairwise, bucketed
from jaxrank.losses._common import Flat, Positives, check_input, flatten, smoothed_step
from jaxrank.losses._ramp import (
  locate,
  located_counts,
  located_ramp_values,
  located_window_sums,
  make_thresholds,
  ramp_at_points,
  sums_over_points,
  sums_over_slots,
  windows,
)
from jaxrank.losses._shared import (
  MAX_IOU_TARGET,
  RS_EPS,
  Chunk,
  LossParts,
  RankingErrors,
  Sorted,
  StreamParts,
  add_at,
  over_chunks,
  per_entry,
  ranking_impl,
  set_at,
  slot_targets,
  sorting_errors,
  sorting_part,
  sorting_received,
  static_options,
  without_errors,
)
from jaxrank.losses._vjp import error_driven

Array = jax.Array

__all__ = ["ALRP_EPS", "RS_EPS", "RankingErrors", "alrp_loss", "ap_loss", "rank_sort_loss",
           "ranking_errors"]

ALRP_EPS = 1e-5


def _negative_sums(flat: Flat, pos: Positives, delta: float):
  th = windows(pos.logits, pos.count, delta)
  nfp, index = sums_over_points(th, flat.logits, flat.negative)
  return th, index, nfp


def _assemble(th, index, flat: Flat, pos: Positives, coeff, grad_pos):
  """Negatives' gradient ``Σ_i coeff_i H(s_j - s_i)`` plus the positives' own gradient."""
  grad = ramp_at_points(th, coeff, flat.logits, flat.negative, index)
  return grad.at[pos.index].add(jnp.where(pos.mask, grad_pos, 0.0))


def _ap_body(flat: Flat, pos: Positives, n, delta: float) -> LossParts:
  th, bucket, nfp = _negative_sums(flat, pos, delta)
  rank_plus = sums_over_slots(th, pos.logits, pos.mask) + (1.0 - smoothed_step(0.0, delta))
  rank = rank_plus + nfp
  precision = jnp.where(pos.mask, rank_plus / rank, 0.0)
  interpolated = lax.cummax(precision)  # positives are in ascending-logit order
  previous = jnp.concatenate([jnp.zeros(1, jnp.float32), interpolated[:-1]])
  updated = precision >= previous
  weight = jnp.where(updated, 1.0, (1.0 - interpolated) / jnp.where(updated, 1.0, 1.0 - precision))
  error = jnp.where(pos.mask, 1.0 - interpolated, 0.0)
  loss = jnp.sum(error) / n
  coeff = jnp.where(pos.mask, weight / rank / n, 0.0)
  grad = _assemble(th, bucket, flat, pos, coeff, -error / n)
  return LossParts((loss,), grad, error)


def _alrp_body(flat: Flat, pos: Positives, n, delta: float, loc_errors) -> LossParts:
  loc = jnp.where(pos.mask, jnp.asarray(loc_errors, jnp.float32).reshape(-1)[pos.index], 0.0)
  invalid = jnp.any(pos.mask & ~(loc >= 0))  # negative or NaN localisation error
  th, bucket, nfp = _negative_sums(flat, pos, delta)
  self_term = smoothed_step(0.0, delta)
  rank_plus = sums_over_slots(th, pos.logits, pos.mask) + (1.0 - self_term)
  rank = rank_plus + nfp
  error = jnp.where(pos.mask, nfp / rank, 0.0)
  cls_loss = jnp.sum(error) / n
  loc_above = sums_over_slots(th, pos.logits, loc) - self_term * loc  # Σ_{k≠i} H(s_k - s_i) e_k
  primary = (loc_above + nfp) / rank
  active = pos.mask & (nfp > ALRP_EPS)
  coeff = jnp.where(active, primary / (jnp.where(active, nfp, 1.0) * n), 0.0)
  grad = _assemble(th, bucket, flat, pos, coeff, jnp.where(active, -primary / n, 0.0))
  # L_loc = (1/|P|) Σ_m (Σ_{m'≤m} e_π(m')) / rank(π(m)) over descending logits π, rank constant,
  # is linear in e: weight of a positive = (1/|P|) Σ of 1/rank over it and every lower positive.
  loc_weight = jnp.cumsum(jnp.where(pos.mask, 1.0 / rank, 0.0)) / n
  return LossParts((cls_loss, per_entry(flat, pos, loc_weight)), grad, error, invalid=invalid)


def _rank_sort_body(flat: Flat, pos: Positives, n, delta: float) -> LossParts:
  th, bucket, nfp = _negative_sums(flat, pos, delta)
  rank_plus, sorting_error, sorting_grad = sorting_part(pos, delta)
  rank = jnp.where(pos.mask, rank_plus + nfp, 1.0)
  has_fp = pos.mask & (nfp > RS_EPS)
  ranking_error = jnp.where(pos.mask, nfp / rank, 0.0)
  values = (jnp.sum(ranking_error) / n, jnp.sum(sorting_error) / n)
  coeff = jnp.where(has_fp, 1.0 / (rank * n), 0.0)  # RE(i) / N_FP(i) / |P|
  grad_pos = (sorting_grad - jnp.where(has_fp, ranking_error, 0.0)) / n
  grad = _assemble(th, bucket, flat, pos, coeff, grad_pos)
  return LossParts(values, grad, ranking_error, sorting_error)


# Many positives without ``max_positives`` under ``jit``: the same computations over the sorted
# positives chunk by chunk (see ``_shared.over_chunks``). Each chunk's windows take one pass over
# the entries; what follows from the ascending order (interpolation, cumulative sums) is carried
# from chunk to chunk, and the results go straight to the entries.


def _chunk_sums(flat: Flat, chunk: Chunk, delta: float):
  """The chunk's windows, the bucket of every entry, and the window sums over the negatives
  (``N_FP``) and over the positives (``Σ_{k∈P} H(s_k - s_i)``, self term ``H(0)`` included)."""
  th = make_thresholds(chunk.logits, delta)
  index = locate(th, flat.logits, flat.positive | flat.negative)
  nfp, rank_plus = located_counts(th, flat.logits, index, flat.positive)
  return th, index, nfp, rank_plus


def _with_negatives(grad, flat: Flat, th, index, coeff):
  """``grad`` plus ``Σ_i coeff_i H(s_j - s_i)`` (the chunk's positives) at the negatives."""
  return grad + jnp.where(flat.negative, located_ramp_values(th, coeff, flat.logits, index), 0.0)


def _zeros_if(flag: bool, flat: Flat):
  return jnp.zeros_like(flat.logits) if flag else None


def _ap_stream(flat: Flat, sp: Sorted, n, delta: float, *, errors: bool) -> StreamParts:
  self_term = 1.0 - smoothed_step(0.0, delta)

  def body(chunk: Chunk, carry):
    grad, ranking, best, total = carry
    th, index, nfp, rank_plus = _chunk_sums(flat, chunk, delta)
    rank_plus = rank_plus + self_term
    rank = rank_plus + nfp
    precision = jnp.where(chunk.mask, rank_plus / rank, 0.0)
    interpolated = jnp.maximum(lax.cummax(precision), best)
    previous = jnp.concatenate([best[None], interpolated[:-1]])
    updated = precision >= previous
    weight = jnp.where(updated, 1.0,
                       (1.0 - interpolated) / jnp.where(updated, 1.0, 1.0 - precision))
    error = jnp.where(chunk.mask, 1.0 - interpolated, 0.0)
    coeff = jnp.where(chunk.mask, weight / rank / n, 0.0)
    grad = add_at(_with_negatives(grad, flat, th, index, coeff), chunk, -error / n)
    ranking = None if ranking is None else add_at(ranking, chunk, error)
    return grad, ranking, interpolated[-1], total + jnp.sum(error)

  zero = jnp.zeros((), jnp.float32)
  grad, ranking, _, total = over_chunks(
      flat, sp, body, (jnp.zeros_like(flat.logits), _zeros_if(errors, flat), zero, zero))
  return StreamParts((total / n,), grad, ranking)


def _alrp_stream(flat: Flat, sp: Sorted, n, delta: float, loc_errors, *,
                 errors: bool) -> StreamParts:
  loc_errors = jnp.asarray(loc_errors, jnp.float32).reshape(-1)
  invalid = jnp.any(flat.positive & ~(loc_errors >= 0))
  self_term = smoothed_step(0.0, delta)

  def body(chunk: Chunk, carry):
    grad, loc_weight, ranking, prefix, total = carry
    th, index, nfp, rank_plus = _chunk_sums(flat, chunk, delta)
    loc_sum = located_window_sums(th, flat.logits, index, loc_errors, where=flat.positive)
    rank = rank_plus + (1.0 - self_term) + nfp
    error = jnp.where(chunk.mask, nfp / rank, 0.0)
    loc_above = loc_sum - self_term * jnp.where(chunk.mask, loc_errors[chunk.index], 0.0)
    primary = (loc_above + nfp) / rank
    active = chunk.mask & (nfp > ALRP_EPS)
    coeff = jnp.where(active, primary / (jnp.where(active, nfp, 1.0) * n), 0.0)
    grad = add_at(_with_negatives(grad, flat, th, index, coeff), chunk,
                  jnp.where(active, -primary / n, 0.0))
    inverse = prefix + jnp.cumsum(jnp.where(chunk.mask, 1.0 / rank, 0.0))
    loc_weight = add_at(loc_weight, chunk, inverse / n)
    ranking = None if ranking is None else add_at(ranking, chunk, error)
    return grad, loc_weight, ranking, inverse[-1], total + jnp.sum(error)

  zero = jnp.zeros((), jnp.float32)
  init = (jnp.zeros_like(flat.logits), jnp.zeros_like(flat.logits), _zeros_if(errors, flat),
          zero, zero)
  grad, loc_weight, ranking, _, total = over_chunks(flat, sp, body, init)
  return StreamParts((total / n, loc_weight), grad, ranking, invalid=invalid)


def _rank_sort_stream(flat: Flat, sp: Sorted, n, delta: float, *, errors: bool) -> StreamParts:
  block = _pairwise.block_size(sp.chunk)
  assert sp.chunk % block == 0, (sp.chunk, block)
  targets = lambda start: slot_targets(flat, sp, start, block)

  def first(chunk: Chunk, carry):
    # The chunk's rows of the positive-positive sums. What a positive gives away of its sorting
    # error waits for the second pass in the gradient's entry of that positive.
    pmf_scale, given, sorting, total = carry
    _, sorting_error, chunk_scale, chunk_given = sorting_errors(
        sp.logits, targets, sp.count, chunk.mask, delta, block=block, first_row=chunk.start,
        num_rows=sp.chunk)
    pmf_scale = lax.dynamic_update_slice_in_dim(pmf_scale, chunk_scale, chunk.start, 0)
    sorting = None if sorting is None else add_at(sorting, chunk, sorting_error)
    return (pmf_scale, set_at(given, chunk, chunk_given), sorting,
            total + jnp.sum(sorting_error))

  zero = jnp.zeros((), jnp.float32)
  pmf_scale, grad, sorting, sorting_total = over_chunks(
      flat, sp, first, (jnp.zeros(sp.logits.shape, jnp.float32), jnp.zeros_like(flat.logits),
                        _zeros_if(errors, flat), zero))
  columns = lambda start: (targets(start)[0], lax.dynamic_slice_in_dim(pmf_scale, start, block))

  def second(chunk: Chunk, carry):
    grad, ranking, total = carry
    # rank⁺ over the entries, as AP does (the same sum as the first pass's, not kept from it)
    th, index, nfp, rank_plus = _chunk_sums(flat, chunk, delta)
    received = sorting_received(sp.logits, columns, sp.count, delta, block=block,
                                first_row=chunk.start, num_rows=sp.chunk)
    sorting_grad = received - jnp.where(chunk.mask, grad[chunk.index], 0.0)
    rank = jnp.where(chunk.mask, rank_plus + nfp, 1.0)
    has_fp = chunk.mask & (nfp > RS_EPS)
    ranking_error = jnp.where(chunk.mask, nfp / rank, 0.0)
    coeff = jnp.where(has_fp, 1.0 / (rank * n), 0.0)
    grad_pos = (sorting_grad - jnp.where(has_fp, ranking_error, 0.0)) / n
    grad = set_at(_with_negatives(grad, flat, th, index, coeff), chunk, grad_pos)
    ranking = None if ranking is None else add_at(ranking, chunk, ranking_error)
    return grad, ranking, total + jnp.sum(ranking_error)

  grad, ranking, ranking_total = over_chunks(
      flat, sp, second, (grad, _zeros_if(errors, flat), zero))
  return StreamParts((ranking_total / n, sorting_total / n), grad, ranking, sorting)


_ap_impl = ranking_impl(_ap_body, name="ap_loss", stream=_ap_stream)
_alrp_impl = ranking_impl(_alrp_body, name="alrp_loss", stream=_alrp_stream)
_rank_sort_impl = ranking_impl(_rank_sort_body, name="rank_sort_loss", max_target=MAX_IOU_TARGET,
                               stream=_rank_sort_stream)

_ap = error_driven(without_errors(_ap_impl), 2)
_alrp = error_driven(without_errors(_alrp_impl), 3)
_rank_sort = error_driven(without_errors(_rank_sort_impl), 2)


def ap_loss(logits, targets, *, delta: float = 1.0, where=None,
            max_positives: int | None = None) -> Array:
  r"""AP Loss (Chen et al., 2019): one minus the smoothed, interpolated average precision.

  .. math::
     p(i) = \frac{1 + \sum_{k \in P, k \ne i} H_\delta(s_k - s_i)}{rank(i)}, \quad
     \mathcal{L}_{AP} = 1 - \frac{1}{|P|} \sum_{i \in P} \tilde p(i),

  where ``p̃(i) = max{p(k) : s_k <= s_i}`` is the interpolated precision. The gradient is the
  published error-driven update: a positive gets ``-(1 - p̃(i)) / |P|`` and each negative its
  share ``(1/|P|) Σ_i w_i H_δ(s_j - s_i) / rank(i)`` with ``w_i`` rescaling for interpolation.

  Cost: O((N + P) log P) time, O(N + P) memory; exact.

  Args:
    logits: scores of any shape (raw logits, before the sigmoid). Any float dtype; computed in
      float32.
    targets: same shape; ``> 0`` positive, ``0`` negative, ``-1`` (any negative value) ignored.
      The published code tests ``== 1``; here any positive value marks a positive.
    delta: half-width of the smoothed step ``H_δ``; 1.0 as published.
    where: optional boolean mask broadcastable to ``logits``; ``False`` ignores an entry.
    max_positives: static number of positive slots; more positives than slots gives a NaN
      loss. Under ``jit`` with traced targets it defaults to the number of entries: up to 4096
      real positives then cost about what the bound would, more are handled in chunks of 8192
      (a sort of the entries, then one pass over the logits per chunk of sorted positives, with
      a few arrays of the entries' size in memory); pass it in training steps.

  Returns:
    The scalar loss (float32); 0 with zero gradient when there are no positives.

  Raises:
    ValueError: NaN ``targets`` (concrete). Under ``jit`` with traced targets the check cannot
      run and the loss and its gradient are NaN instead; likewise for a non-finite logit of a
      non-ignored entry and for more positives than ``max_positives``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxrank import losses
    >>> logits = jnp.array([2.0, 1.0, 0.5, -1.0])
    >>> targets = jnp.array([1.0, 0.0, 1.0, 0.0])
    >>> round(float(losses.ap_loss(logits, targets)), 4)
    0.1364
    >>> grad = jax.grad(losses.ap_loss)(logits, targets)
    >>> bool(abs(grad.sum()) < 1e-6)  # negatives get what positives lose
    True
  """
  static = static_options("ap_loss", logits, targets, delta, max_positives, allow_zero=False,
                          where=where)
  return _ap(static, logits, targets, where)[0]


def alrp_loss(logits, targets, loc_errors, *, delta: float = 1.0, where=None,
              max_positives: int | None = None) -> tuple[Array, Array]:
  r"""aLRP Loss (Oksuz et al., 2020): classification and localisation parts.

  .. math::
     \mathcal{L}_{cls} = \frac{1}{|P|} \sum_{i \in P} \frac{N_{FP}(i)}{rank(i)}, \quad
     \mathcal{L}_{loc} = \frac{1}{|P|} \sum_{m} \frac{\sum_{m' \le m} e_{\pi(m')}}{rank(\pi(m))},

  with ``rank⁺(i) = 1 + Σ_{k≠i} H_δ(s_k - s_i)`` and ``π`` the positives by descending logit.
  The gradient of ``cls_loss`` w.r.t. ``logits`` is the published error-driven update, which
  also carries localisation terms: positive ``i`` gets ``-ℓ_i / |P|`` with ``ℓ_i = (Σ_{k≠i}
  H(s_k - s_i) e_k + N_FP(i)) / rank(i)`` when ``N_FP(i) > 1e-5``. ``loc_loss`` is differentiable
  w.r.t. ``loc_errors`` with ``rank`` held constant, as in the published head; combine them as
  ``cls_loss + w * loc_loss`` with the self-balance weight of
  :func:`jaxrank.losses.alrp_self_balance_update`.

  Cost: O((N + P) log P) time, O(N + P) memory; exact. Positives with tied logits are ordered
  in ``π`` by a stable sort (the published unstable sort makes that order arbitrary).

  Args:
    logits: scores of any shape.
    targets: same shape; ``> 0`` positive, ``0`` negative, ``< 0`` ignored.
    loc_errors: same shape; the localisation error ``e`` of each positive (published: ``1 -
      GIoU``, in [0, 2]); read only at positives.
    delta: half-width of the smoothed step; 1.0 as published.
    where: optional mask; ``False`` ignores an entry.
    max_positives: static number of positive slots (see :func:`ap_loss`).

  Returns:
    ``(cls_loss, loc_loss)``, float32 scalars; zeros when there are no positives.

  Raises:
    ValueError: NaN ``targets``, or a negative or NaN ``loc_errors`` at a positive, when they
      are concrete. Traced (under ``jit``), both losses and the gradient are NaN instead.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxrank import losses
    >>> logits = jnp.array([2.0, 1.0, 0.5, -1.0])
    >>> targets = jnp.array([1.0, 0.0, 1.0, 0.0])
    >>> cls_loss, loc_loss = losses.alrp_loss(logits, targets, jnp.array([0.2, 0.0, 0.5, 0.0]))
    >>> round(float(cls_loss), 4), round(float(loc_loss), 4)
    (0.1364, 0.2273)
  """
  static = static_options("alrp_loss", logits, targets, delta, max_positives, allow_zero=False,
                          where=where, extra={"loc_errors": loc_errors})
  check_input(_negative_loc_at_positive, targets, loc_errors, True if where is None else where,
              message="alrp_loss: loc_errors must be >= 0 (and not NaN) at positives")
  cls_loss, loc_weight = _alrp(static, logits, targets, lax.stop_gradient(loc_errors), where)
  flat = flatten(logits, targets, where, name="alrp_loss")
  loc = jnp.where(flat.positive, jnp.asarray(loc_errors).astype(jnp.float32).reshape(-1), 0.0)
  return cls_loss, jnp.sum(loc * lax.stop_gradient(loc_weight))


def rank_sort_loss(logits, targets, *, delta: float = 0.5, where=None,
                   max_positives: int | None = None) -> Array:
  r"""Rank & Sort Loss (Oksuz et al., 2021): ranking error plus sorting error.

  .. math::
     RE(i) = \frac{N_{FP}(i)}{rank(i)}, \quad
     SE(i) = \frac{\sum_{k \in P} H(s_k - s_i)(1 - y_k)}{rank^+(i)}
           - \frac{\sum_{k \in P, y_k \ge y_i} H(s_k - s_i)(1 - y_k)}{\sum_{k \in P, y_k \ge y_i} H(s_k - s_i)},

  ``L = mean_i RE(i) + mean_i SE(i)``, with continuous targets ``y`` (the IoU of each positive's
  predicted box) and ``rank⁺`` including the self term ``H(0)``. The gradient is the published
  update: ranking errors spread over the negatives above each positive, sorting errors over the
  lower-IoU positives above it; the whole gradient follows the returned value.

  Cost: O((N + P) log P + P²) time, O(N + P) memory (the P² part in blocks); exact.

  Args:
    logits: scores of any shape.
    targets: same shape; ``> 0`` positive with that IoU target (a positive whose IoU is 0 is a
      negative, as published), ``0`` negative, ``< 0`` ignored.
    delta: half-width of the smoothed step; 0.5 as published. ``0`` gives the unit step.
    where: optional mask; ``False`` ignores an entry.
    max_positives: static number of positive slots (see :func:`ap_loss`).

  Returns:
    The scalar ``ranking + sorting`` loss; use :func:`ranking_errors` for the two parts.

  Raises:
    ValueError: NaN ``targets`` or ``targets > 1`` (the targets of positives are IoUs), when
      concrete. With traced targets (under ``jit``) the loss and its gradient are NaN instead.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxrank import losses
    >>> logits = jnp.array([2.0, 1.0, 0.5, -1.0])
    >>> targets = jnp.array([0.6, 0.0, 0.9, 0.0])
    >>> round(float(losses.rank_sort_loss(logits, targets)), 4)
    0.3
  """  # noqa: E501
  static = static_options("rank_sort_loss", logits, targets, delta, max_positives, allow_zero=True,
                          where=where, max_target=MAX_IOU_TARGET)
  ranking, sorting = _rank_sort(static, logits, targets, where)
  return ranking + sorting


def _negative_loc_at_positive(xp, targets, loc_errors, where):
  positive = (targets > 0) & xp.broadcast_to(xp.asarray(where, bool), targets.shape)
  return (positive & ~(loc_errors.astype(xp.float32) >= 0)).any()


_ERRORS = {
    "ap": (_ap_impl, 1.0, False, None),
    "alrp": (_alrp_impl, 1.0, False, None),
    "rank_sort": (_rank_sort_impl, 0.5, True, MAX_IOU_TARGET),
}


def ranking_errors(logits, targets, *, loss: str = "rank_sort", delta: float | None = None,
                   where=None, loc_errors=None, max_positives: int | None = None) -> RankingErrors:
  """Per-positive ranking (and sorting) errors of a ranking loss, for logging and analysis.

  The loss value is the mean of ``ranking + sorting`` over positives (for aLRP, of ``ranking``:
  its classification part). No gradient flows through the result.

  Args:
    logits, targets, where, max_positives: as for the loss.
    loss: ``"ap"``, ``"alrp"``, ``"rank_sort"``, ``"bucketed_ap"`` or ``"bucketed_rank_sort"``.
    delta: the loss's ``delta``; default as published for that loss.
    loc_errors: aLRP only; does not change the errors returned (defaults to zeros).
  """
  table = dict(_ERRORS, **bucketed.ERRORS)
  if loss not in table:
    raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(table)}")
  impl, default_delta, allow_zero, max_target = table[loss]
  delta = default_delta if delta is None else delta
  static = static_options(loss, logits, targets, delta, max_positives, allow_zero=allow_zero,
                          where=where, max_target=max_target)
  logits = lax.stop_gradient(jnp.asarray(logits))
  if loss == "alrp":
    loc = jnp.zeros(jnp.shape(logits)) if loc_errors is None else loc_errors
    errors = impl(static, logits, targets, lax.stop_gradient(loc), where)[2]
  else:
    errors = impl(static, logits, targets, where)[2]
  shape = jnp.shape(logits)
  return RankingErrors(*(e.reshape(shape) for e in errors))
