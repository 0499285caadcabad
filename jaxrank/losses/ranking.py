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

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrank.losses import _pairwise
from jaxrank.losses._common import (Flat, Positives, check_delta, finish, flatten, gather_positives,
                                    resolve_max_positives, smoothed_step)
from jaxrank.losses._ramp import bucketize, make_thresholds, ramp_values, window_sums
from jaxrank.losses._vjp import error_driven

Array = jax.Array

RS_EPS = 1e-10
ALRP_EPS = 1e-5


class RankingErrors(NamedTuple):
  """Per-positive errors, laid out like ``logits`` (zero outside positives).

  Attributes:
    ranking: the ranking error of each positive: ``1 - p̃(i)`` for AP (interpolated precision),
      ``N_FP(i) / rank(i)`` for aLRP, RS and the bucketed losses.
    sorting: the sorting error ``SE(i)`` of RS and bucketed RS; zero for the other losses.
    positive: which entries are positives.
  """
  ranking: Array
  sorting: Array
  positive: Array


def _negative_sums(flat: Flat, pos: Positives, delta: float):
  th = make_thresholds(pos.logits, delta)
  bucket = bucketize(th, flat.logits)
  nfp = window_sums(th, flat.logits, flat.negative, bucket)
  return th, bucket, nfp


def _assemble(th, bucket, flat: Flat, pos: Positives, coeff, grad_pos):
  """Negatives' gradient ``Σ_i coeff_i H(s_j - s_i)`` plus the positives' own gradient."""
  grad = jnp.where(flat.negative, ramp_values(th, coeff, flat.logits, bucket), 0.0)
  return grad.at[pos.index].add(jnp.where(pos.mask, grad_pos, 0.0))


def _per_entry(flat: Flat, pos: Positives, values):
  return jnp.zeros_like(flat.logits).at[pos.index].add(jnp.where(pos.mask, values, 0.0))


def _ap_impl(static, logits, targets, where):
  delta, max_positives = static
  flat = flatten(logits, targets, where, name="ap_loss")
  pos = gather_positives(flat, max_positives)
  n = jnp.maximum(pos.count, 1).astype(jnp.float32)
  th, bucket, nfp = _negative_sums(flat, pos, delta)
  rank_plus = window_sums(th, pos.logits, pos.mask) + (1.0 - smoothed_step(0.0, delta))
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
  (loss,), grad = finish((loss,), grad, flat, pos)
  errors = RankingErrors(_per_entry(flat, pos, error), jnp.zeros_like(flat.logits), flat.positive)
  return (loss,), grad.reshape(logits.shape).astype(logits.dtype), errors


def _alrp_impl(static, logits, targets, loc_errors, where):
  delta, max_positives = static
  flat = flatten(logits, targets, where, name="alrp_loss")
  pos = gather_positives(flat, max_positives)
  n = jnp.maximum(pos.count, 1).astype(jnp.float32)
  loc = jnp.where(pos.mask, jnp.asarray(loc_errors, jnp.float32).reshape(-1)[pos.index], 0.0)
  th, bucket, nfp = _negative_sums(flat, pos, delta)
  self_term = smoothed_step(0.0, delta)
  rank_plus = window_sums(th, pos.logits, pos.mask) + (1.0 - self_term)
  rank = rank_plus + nfp
  error = jnp.where(pos.mask, nfp / rank, 0.0)
  cls_loss = jnp.sum(error) / n
  loc_above = window_sums(th, pos.logits, loc) - self_term * loc  # Σ_{k≠i} H(s_k - s_i) e_k
  primary = (loc_above + nfp) / rank
  active = pos.mask & (nfp > ALRP_EPS)
  coeff = jnp.where(active, primary / (jnp.where(active, nfp, 1.0) * n), 0.0)
  grad = _assemble(th, bucket, flat, pos, coeff, jnp.where(active, -primary / n, 0.0))
  # L_loc = (1/|P|) Σ_m (Σ_{m'≤m} e_π(m')) / rank(π(m)) over descending logits π, rank constant,
  # is linear in e: weight of a positive = (1/|P|) Σ of 1/rank over it and every lower positive.
  loc_weight = jnp.cumsum(jnp.where(pos.mask, 1.0 / rank, 0.0)) / n
  (cls_loss, loc_weight), grad = finish((cls_loss, _per_entry(flat, pos, loc_weight)), grad, flat, pos)
  errors = RankingErrors(_per_entry(flat, pos, error), jnp.zeros_like(flat.logits), flat.positive)
  return (cls_loss, loc_weight), grad.reshape(logits.shape).astype(logits.dtype), errors


def _sorting_part(pos: Positives, delta: float):
  """RS's positive-positive sums: ``rank⁺``, current and target sorting terms, ``D``, and the
  sorting-pmf column sums, in blocks."""
  block = _pairwise.block_size(pos.logits.shape[0])
  s = _pairwise.pad_to_blocks(pos.logits, block, pos.logits[-1])
  y = _pairwise.pad_to_blocks(pos.targets, block, 0.0)
  m = _pairwise.pad_to_blocks(pos.mask.astype(jnp.float32), block, 0.0)
  count = jnp.minimum(pos.count, pos.logits.shape[0])
  slots = pos.logits.shape[0]

  def relations(row_s, row_data, col_s, col_data):
    row_y = row_data[0]
    col_y, col_m = col_data
    h = smoothed_step(col_s[None, :] - row_s[:, None], delta) * col_m[None, :]
    higher_iou = jnp.where(col_y[None, :] >= row_y[:, None], h, 0.0)
    residual = (1.0 - col_y)[None, :]
    return h, h * residual, higher_iou, higher_iou * residual, h - higher_iou

  rank_plus, current, target_den, target_num, missorted = _pairwise.row_sums(
      relations, 5, s, (y, m), count, block=block, lower_reach=delta)
  rank_plus, current, target_den, target_num, missorted = (
      a[:slots] for a in (rank_plus, current, target_den, target_num, missorted))
  safe = lambda d: jnp.where(pos.mask, d, 1.0)
  sorting_error = jnp.where(pos.mask, current / safe(rank_plus) - target_num / safe(target_den), 0.0)
  has_missorted = pos.mask & (missorted > RS_EPS)
  pmf_scale = jnp.where(has_missorted, sorting_error / jnp.where(has_missorted, missorted, 1.0), 0.0)

  def pmf(row_s, row_data, col_s, col_data):
    row_y = row_data[0]
    col_y, col_scale = col_data
    h = smoothed_step(row_s[:, None] - col_s[None, :], delta)
    return (jnp.where(col_y[None, :] > row_y[:, None], h * col_scale[None, :], 0.0),)

  (received,) = _pairwise.row_sums(pmf, 1, s, (y, _pairwise.pad_to_blocks(pmf_scale, block, 0.0)),
                                   count, block=block, upper_reach=delta)
  sorting_grad = received[:slots] - jnp.where(has_missorted, sorting_error, 0.0)
  return rank_plus, sorting_error, sorting_grad


def _rank_sort_impl(static, logits, targets, where):
  delta, max_positives = static
  flat = flatten(logits, targets, where, name="rank_sort_loss")
  pos = gather_positives(flat, max_positives)
  n = jnp.maximum(pos.count, 1).astype(jnp.float32)
  th, bucket, nfp = _negative_sums(flat, pos, delta)
  rank_plus, sorting_error, sorting_grad = _sorting_part(pos, delta)
  rank = jnp.where(pos.mask, rank_plus + nfp, 1.0)
  has_fp = pos.mask & (nfp > RS_EPS)
  ranking_error = jnp.where(pos.mask, nfp / rank, 0.0)
  values = (jnp.sum(ranking_error) / n, jnp.sum(sorting_error) / n)
  coeff = jnp.where(has_fp, 1.0 / (rank * n), 0.0)  # RE(i) / N_FP(i) / |P|
  grad_pos = (sorting_grad - jnp.where(has_fp, ranking_error, 0.0)) / n
  grad = _assemble(th, bucket, flat, pos, coeff, grad_pos)
  values, grad = finish(values, grad, flat, pos)
  errors = RankingErrors(_per_entry(flat, pos, ranking_error), _per_entry(flat, pos, sorting_error),
                         flat.positive)
  return values, grad.reshape(logits.shape).astype(logits.dtype), errors


def _drop_errors(impl):
  return lambda *a: impl(*a)[:2]


_ap = error_driven(_drop_errors(_ap_impl), 2)
_alrp = error_driven(_drop_errors(_alrp_impl), 3)
_rank_sort = error_driven(_drop_errors(_rank_sort_impl), 2)


def _static(name, logits, targets, delta, max_positives, *, allow_zero, where=None, extra=None):
  flatten(logits, targets, where, name=name, extra=extra)  # shape and target checks
  return (check_delta(delta, allow_zero=allow_zero),
          resolve_max_positives(max_positives, targets, name=name))


def ap_loss(logits, targets, *, delta: float = 1.0, where=None, max_positives: int | None = None) -> Array:
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
    max_positives: static number of positive slots. Needed under ``jit`` with traced targets
      for speed (default: the number of entries, correct but O(N log N)); more positives than
      slots gives a NaN loss.

  Returns:
    The scalar loss (float32); 0 with zero gradient when there are no positives.

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
  static = _static("ap_loss", logits, targets, delta, max_positives, allow_zero=False, where=where)
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
  """
  static = _static("alrp_loss", logits, targets, delta, max_positives, allow_zero=False, where=where,
                   extra={"loc_errors": loc_errors})
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

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxrank import losses
    >>> logits = jnp.array([2.0, 1.0, 0.5, -1.0])
    >>> targets = jnp.array([0.6, 0.0, 0.9, 0.0])
    >>> round(float(losses.rank_sort_loss(logits, targets)), 4)
    0.3
  """
  static = _static("rank_sort_loss", logits, targets, delta, max_positives, allow_zero=True, where=where)
  ranking, sorting = _rank_sort(static, logits, targets, where)
  return ranking + sorting


_ERRORS = {
    "ap": (_ap_impl, 1.0, False),
    "alrp": (_alrp_impl, 1.0, False),
    "rank_sort": (_rank_sort_impl, 0.5, True),
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
  from jaxrank.losses import bucketed  # noqa: PLC0415 - bucketed imports this module
  table = dict(_ERRORS, **bucketed.ERRORS)
  if loss not in table:
    raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(table)}")
  impl, default_delta, allow_zero = table[loss]
  delta = default_delta if delta is None else delta
  static = _static(loss, logits, targets, delta, max_positives, allow_zero=allow_zero, where=where)
  logits = lax.stop_gradient(jnp.asarray(logits))
  if loss == "alrp":
    loc = jnp.zeros(jnp.shape(logits)) if loc_errors is None else loc_errors
    errors = impl(static, logits, targets, lax.stop_gradient(loc), where)[2]
  else:
    errors = impl(static, logits, targets, where)[2]
  shape = jnp.shape(logits)
  return RankingErrors(*(e.reshape(shape) for e in errors))
