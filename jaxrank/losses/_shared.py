"""Building blocks shared by the exact and the bucketed ranking losses (internal)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrank.losses import _pairwise
from jaxrank.losses._common import (
  Flat,
  Positives,
  check_delta,
  finish,
  flatten,
  gather_positives,
  resolve_max_positives,
  smoothed_step,
)

Array = jax.Array

RS_EPS = 1e-10
#: Positive slots tried first when ``max_positives`` is not given under ``jit`` (the slot count
#: is then the number of entries): at most this many positives run as if it had been given.
FEW_POSITIVES = 4096
#: Largest target of RS and bucketed RS: targets of positives are IoUs.
MAX_IOU_TARGET = 1.0


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


class LossParts(NamedTuple):
  """What the body of a ranking loss computes, per positive slot (see :func:`ranking_impl`)."""
  values: tuple             # scalars; the first carries the gradient
  grad: Array               # [N] error-driven gradient w.r.t. the flat logits
  ranking: Array            # [P] ranking error of each positive slot
  sorting: Array | None = None  # [P] sorting error; None for zeros
  invalid: Array | bool = False  # [] traced input that an eager call would reject (NaN result)


def per_entry(flat: Flat, pos: Positives, values):
  """``[P]`` values of the positive slots laid out over the ``[N]`` flat entries."""
  return jnp.zeros_like(flat.logits).at[pos.index].add(jnp.where(pos.mask, values, 0.0))


def ranking_impl(body: Callable[..., LossParts], *, name: str, max_target: float | None = None):
  """``impl(static, logits, targets, *extra, where) -> (values, grad, errors)`` from a body.

  The returned function flattens and checks the inputs, gathers the positives, calls
  ``body(flat, pos, n, delta, *extra)`` (``n = max(|P|, 1)``), then makes the values and the
  gradient 0 without positives and NaN for bad input, and lays the errors out like ``logits``.
  """

  def impl(static, logits, targets, *args, errors: bool = True):
    *extra, where = args
    delta, max_positives = static
    flat = flatten(logits, targets, where, name=name, max_target=max_target)

    def run(slots):
      pos = gather_positives(flat, slots)
      n = jnp.maximum(pos.count, 1).astype(jnp.float32)
      parts = body(flat, pos, n, delta, *extra)
      checked = flat._replace(invalid=flat.invalid | parts.invalid)
      values, grad = finish(parts.values, parts.grad, checked, pos)
      if not errors:
        return values, grad
      sorting = (jnp.zeros_like(flat.logits) if parts.sorting is None
                 else per_entry(flat, pos, parts.sorting))
      return values, grad, RankingErrors(per_entry(flat, pos, parts.ranking), sorting,
                                         flat.positive)

    if max_positives > FEW_POSITIVES and max_positives >= flat.logits.shape[0]:
      # No bound given under jit: few real positives take the small slot count, so the cost
      # and memory follow the real positives rather than the number of entries.
      few = jnp.sum(flat.positive) <= FEW_POSITIVES
      out = lax.cond(few, lambda: run(FEW_POSITIVES), lambda: run(max_positives))
    else:
      out = run(max_positives)
    return (out[0], out[1].reshape(logits.shape).astype(logits.dtype)) + tuple(out[2:])

  return impl


def without_errors(impl):
  """``impl`` returning ``(values, grad)`` only, for :func:`jaxrank.losses._vjp.error_driven`."""
  return lambda *a: impl(*a, errors=False)


def static_options(name, logits, targets, delta, max_positives, *, allow_zero, where=None,
                   extra=None, max_target=None):
  """Eager input checks and the static ``(delta, max_positives)`` of a ranking loss."""
  flatten(logits, targets, where, name=name, extra=extra, max_target=max_target)
  return (check_delta(delta, allow_zero=allow_zero),
          resolve_max_positives(max_positives, targets, name=name))


def sorting_part(pos: Positives, delta: float):
  """RS's positive-positive sums: ``rank⁺``, the sorting error and its gradient, in blocks."""
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
  sorting_error = jnp.where(pos.mask,
                            current / safe(rank_plus) - target_num / safe(target_den), 0.0)
  has_missorted = pos.mask & (missorted > RS_EPS)
  pmf_scale = jnp.where(has_missorted,
                        sorting_error / jnp.where(has_missorted, missorted, 1.0), 0.0)

  def pmf(row_s, row_data, col_s, col_data):
    row_y = row_data[0]
    col_y, col_scale = col_data
    h = smoothed_step(row_s[:, None] - col_s[None, :], delta)
    return (jnp.where(col_y[None, :] > row_y[:, None], h * col_scale[None, :], 0.0),)

  (received,) = _pairwise.row_sums(pmf, 1, s, (y, _pairwise.pad_to_blocks(pmf_scale, block, 0.0)),
                                   count, block=block, upper_reach=delta)
  sorting_grad = received[:slots] - jnp.where(has_missorted, sorting_error, 0.0)
  return rank_plus, sorting_error, sorting_grad
