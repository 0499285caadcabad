"""Building blocks shared by the exact and the bucketed ranking losses (internal)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrank.losses import _pairwise, _ramp
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


class StreamParts(NamedTuple):
  """What the many-positives body of a loss computes, laid out over the entries."""
  values: tuple
  grad: Array
  ranking: Array | None = None   # [N] ranking errors (when asked for)
  sorting: Array | None = None   # [N] sorting errors (when asked for); None for zeros
  invalid: Array | bool = False


def per_entry(flat: Flat, pos: Positives, values):
  """``[P]`` values of the positive slots laid out over the ``[N]`` flat entries."""
  return jnp.zeros_like(flat.logits).at[pos.index].add(jnp.where(pos.mask, values, 0.0))


def ranking_impl(body: Callable[..., LossParts], *, name: str, max_target: float | None = None,
                 stream: Callable[..., StreamParts] | None = None):
  """``impl(static, logits, targets, *extra, where) -> (values, grad, errors)`` from a body.

  The returned function flattens and checks the inputs, gathers the positives, calls
  ``body(flat, pos, n, delta, *extra)`` (``n = max(|P|, 1)``), then makes the values and the
  gradient 0 without positives and NaN for bad input, and lays the errors out like ``logits``.

  ``stream(flat, sorted, n, delta, *extra, errors=...)``, when given, replaces the body for
  many positives without ``max_positives`` under ``jit``: it goes over every positive, sorted,
  in chunks (see :func:`over_chunks`), and lays its results straight out over the entries.
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
      values, grad = finish(parts.values, parts.grad, checked, pos.count, pos.overflow)
      if not errors:
        return values, grad
      sorting = (jnp.zeros_like(flat.logits) if parts.sorting is None
                 else per_entry(flat, pos, parts.sorting))
      return values, grad, RankingErrors(per_entry(flat, pos, parts.ranking), sorting,
                                         flat.positive)

    def run_stream():
      sp = sort_positives(flat, _ramp.CHUNK)
      n = jnp.maximum(sp.count, 1).astype(jnp.float32)
      parts = stream(flat, sp, n, delta, *extra, errors=errors)
      checked = flat._replace(invalid=flat.invalid | parts.invalid)
      values, grad = finish(parts.values, parts.grad, checked, sp.count, False)
      if not errors:
        return values, grad
      sorting = jnp.zeros_like(flat.logits) if parts.sorting is None else parts.sorting
      return values, grad, RankingErrors(parts.ranking, sorting, flat.positive)

    if max_positives > FEW_POSITIVES and max_positives >= flat.logits.shape[0]:
      # No bound given under jit: few real positives take the small slot count, so the cost
      # and memory follow the real positives rather than the number of entries; many go over
      # the sorted positives chunk by chunk, keeping no per-slot result for all of them.
      few = jnp.sum(flat.positive) <= FEW_POSITIVES
      many = run_stream if stream is not None else lambda: run(max_positives)
      out = lax.cond(few, lambda: run(FEW_POSITIVES), many)
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


def _relations(delta, row_s, row_data, col_s, col_data):
  row_y = row_data[0]
  col_y, col_m = col_data
  h = smoothed_step(col_s[None, :] - row_s[:, None], delta) * col_m[None, :]
  higher_iou = jnp.where(col_y[None, :] >= row_y[:, None], h, 0.0)
  residual = (1.0 - col_y)[None, :]
  return h, h * residual, higher_iou, higher_iou * residual, h - higher_iou


def _pmf(delta, row_s, row_data, col_s, col_data):
  row_y = row_data[0]
  col_y, col_scale = col_data
  h = smoothed_step(row_s[:, None] - col_s[None, :], delta)
  return (jnp.where(col_y[None, :] > row_y[:, None], h * col_scale[None, :], 0.0),)


def sorting_errors(s, columns, count, mask, delta: float, *, block: int, first_row=0,
                   num_rows: int | None = None):
  """First pass of RS's positive-positive sums, for the rows ``[first_row, + num_rows)``.

  ``s``: ascending logits of every slot (a multiple of ``block``); ``columns``: ``(targets,
  mask as float)`` of the slots, as arrays or as a function of a block's start (see
  :func:`_pairwise.row_sums`); ``mask``: the rows' mask. Returns the rows' ``rank⁺``, sorting
  error, ``pmf_scale`` (what each row hands to the lower-IoU positives above it, for
  :func:`sorting_received`) and the part of the sorting error that the row itself gives away.
  """
  rank_plus, current, target_den, target_num, missorted = _pairwise.row_sums(
      functools.partial(_relations, delta), 5, s, columns, count, block=block, lower_reach=delta,
      first_row=first_row, num_rows=num_rows)
  safe = lambda d: jnp.where(mask, d, 1.0)
  sorting_error = jnp.where(mask, current / safe(rank_plus) - target_num / safe(target_den), 0.0)
  has_missorted = mask & (missorted > RS_EPS)
  pmf_scale = jnp.where(has_missorted,
                        sorting_error / jnp.where(has_missorted, missorted, 1.0), 0.0)
  given = jnp.where(has_missorted, sorting_error, 0.0)
  return rank_plus, sorting_error, pmf_scale, given


def sorting_received(s, columns, count, delta: float, *, block: int, first_row=0,
                     num_rows: int | None = None):
  """Second pass: what each row receives, ``Σ_k pmf_scale_k H(s_i - s_k)`` over ``y_k > y_i``;
  ``columns``: ``(targets, pmf_scale)`` of the slots."""
  (received,) = _pairwise.row_sums(functools.partial(_pmf, delta), 1, s, columns, count,
                                   block=block, upper_reach=delta, first_row=first_row,
                                   num_rows=num_rows)
  return received


def sorting_part(pos: Positives, delta: float):
  """RS's positive-positive sums: ``rank⁺``, the sorting error and its gradient, in blocks."""
  block = _pairwise.block_size(pos.logits.shape[0])
  s = _pairwise.pad_to_blocks(pos.logits, block, pos.logits[-1])
  y = _pairwise.pad_to_blocks(pos.targets, block, 0.0)
  m = _pairwise.pad_to_blocks(pos.mask.astype(jnp.float32), block, 0.0)
  mask = _pairwise.pad_to_blocks(pos.mask, block, False)
  count = jnp.minimum(pos.count, pos.logits.shape[0])
  slots = pos.logits.shape[0]
  rank_plus, sorting_error, pmf_scale, given = sorting_errors(s, (y, m), count, mask, delta,
                                                              block=block)
  received = sorting_received(s, (y, pmf_scale), count, delta, block=block)
  return rank_plus[:slots], sorting_error[:slots], (received - given)[:slots]


class Sorted(NamedTuple):
  """Every positive, sorted by ascending logit, for the many-positives branch.

  The slots are the entries rounded up to a multiple of ``chunk``; the real positives come first
  and the rest repeat the largest positive logit (0 without positives). The per-slot results are
  made chunk by chunk (see :func:`over_chunks`) and go straight to arrays of the entries, so that
  these two are the only arrays of the slot count (RS adds one: what each positive hands on of
  its sorting error, which the second pass over the chunks reads for any positive).
  """
  logits: Array   # [S] float32, ascending
  index: Array    # [S] int32 entry of each slot (any entry for the padding)
  count: Array    # [] int32 number of positives
  chunk: int


class Chunk(NamedTuple):
  """``chunk`` consecutive slots of :class:`Sorted`, from ``start``."""
  start: Array
  logits: Array   # [C] ascending
  index: Array    # [C] int32 entry (0 for padding)
  mask: Array     # [C] bool: a real positive


def sort_positives(flat: Flat, chunk: int) -> Sorted:
  """The positives sorted by logit (a stable sort, as :func:`gather_positives`): one sort of the
  entries with the non-positives keyed ``+inf``, which puts the positives first."""
  n = flat.logits.shape[0]
  slots = -(-n // chunk) * chunk
  key = jnp.pad(jnp.where(flat.positive, flat.logits, jnp.inf), (0, slots - n),
                constant_values=jnp.inf)
  s, index = lax.sort((key, lax.iota(jnp.int32, slots)), num_keys=1, is_stable=True)
  count = jnp.sum(flat.positive, dtype=jnp.int32)
  top = jnp.where(count > 0, s[jnp.maximum(count - 1, 0)], 0.0)
  s = jnp.where(lax.iota(jnp.int32, slots) < count, s, top)
  return Sorted(s, index, count, chunk)


def slot_targets(flat: Flat, sp: Sorted, start, size: int):
  """Targets of the slots ``[start, start + size)`` (0 for padding) and their mask as float."""
  real = start + lax.iota(jnp.int32, size) < sp.count
  index = jnp.where(real, lax.dynamic_slice_in_dim(sp.index, start, size), 0)
  return jnp.where(real, flat.targets[index], 0.0), real.astype(jnp.float32)


def over_chunks(flat: Flat, sp: Sorted, body, init):
  """``body(chunk, carry)`` over the chunks of :class:`Sorted` that hold real positives."""

  def step(c, carry):
    start = c * sp.chunk
    mask = start + lax.iota(jnp.int32, sp.chunk) < sp.count
    index = jnp.where(mask, lax.dynamic_slice_in_dim(sp.index, start, sp.chunk), 0)
    logits = lax.dynamic_slice_in_dim(sp.logits, start, sp.chunk)
    return body(Chunk(start, logits, index, mask), carry)

  return lax.fori_loop(0, (sp.count + sp.chunk - 1) // sp.chunk, step, init)


def add_at(entries, chunk: Chunk, values):
  """``entries`` (``[N]``) plus the chunk's per-slot ``values`` at its positives."""
  return entries.at[chunk.index].add(jnp.where(chunk.mask, values, 0.0))


def set_at(entries, chunk: Chunk, values):
  """``entries`` (``[N]``) with the chunk's per-slot ``values`` at its positives."""
  index = jnp.where(chunk.mask, chunk.index, entries.shape[0])  # padding: dropped
  return entries.at[index].set(values, mode="drop")
