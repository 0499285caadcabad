"""Input handling shared by the ranking losses (internal)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def smoothed_step(x, delta: float):
  """``H_δ(x) = clip(x / 2δ + 1/2, 0, 1)``; the unit step ``1[x >= 0]`` when ``δ = 0``."""
  if delta == 0:
    return (x >= 0).astype(jnp.float32)
  return jnp.clip(x / (2.0 * delta) + 0.5, 0.0, 1.0)


def check_delta(delta, *, allow_zero: bool) -> float:
  if not isinstance(delta, (int, float, np.floating, np.integer)):
    raise TypeError("delta must be a Python number (it is static under jit), "
                    f"got {type(delta).__name__}")
  delta = float(delta)
  if not np.isfinite(delta) or delta < 0 or (delta == 0 and not allow_zero):
    allowed = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"delta must be {allowed}, got {delta}")
  return delta


def concrete(x):
  """``x`` as a NumPy array if it is concrete (not traced), else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_input(condition, *arrays, message: str):
  """An input check that raises when it can and flags the result otherwise.

  ``condition(xp, *arrays)`` is a scalar bool, true for bad input, written with ``xp`` (NumPy
  or ``jax.numpy``). When every array is concrete it is evaluated in NumPy and a true result
  raises ``ValueError(message)``; when one is traced the check cannot run, and the traced flag
  is returned for the caller to make its result NaN (an eager pass returns a false flag).
  """
  values = [concrete(a) for a in arrays]
  if all(v is not None for v in values):
    if bool(condition(np, *values)):
      raise ValueError(message)
    return jnp.zeros((), bool)
  return jnp.asarray(condition(jnp, *(jnp.asarray(a) for a in arrays)), bool)


def check_where(where, shape=None, *, name: str):
  """``where`` as a bool array (broadcast to ``shape`` if given); a mask that is neither bool
  nor numeric (e.g. strings) is a TypeError, nonzero numbers count as True."""
  dtype = getattr(where, "dtype", None)
  if dtype is None:
    dtype = np.asarray(where).dtype
  if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.number)):
    raise TypeError(f"{name}: where must be a boolean mask, got dtype {dtype}")
  where = jnp.asarray(where)
  if shape is None:
    return where.astype(bool)
  try:
    where = jnp.broadcast_to(where, shape)
  except ValueError as e:
    raise ValueError(f"{name}: where of shape {where.shape} does not broadcast to {shape}") from e
  return where.astype(bool)


class Flat(NamedTuple):
  """Flattened float32 inputs and masks."""
  logits: Array     # [N] float32
  targets: Array    # [N] float32
  positive: Array   # [N] bool
  negative: Array   # [N] bool
  finite: Array     # [] bool: every non-ignored logit is finite
  invalid: Array    # [] bool: traced input that an eager call would reject (NaN result)


def flatten(logits, targets, where, *, name: str, extra=None,
            max_target: float | None = None) -> Flat:
  """Checks shapes and flattens ``logits``/``targets``/``where`` to float32 vectors.

  Entries with ``targets < 0`` (the published ``-1``) or ``where == False`` are ignored;
  ``targets > 0`` are positives, ``targets == 0`` negatives. NaN targets, and targets above
  ``max_target`` when given, raise for concrete targets and set ``invalid`` for traced ones.
  """
  logits = jnp.asarray(logits)
  targets = jnp.asarray(targets)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"{name}: logits must be floating point, got {logits.dtype}")
  if logits.shape != targets.shape:
    raise ValueError(f"{name}: logits and targets must have the same shape, "
                     f"got {logits.shape} and {targets.shape}")
  if logits.size == 0:
    raise ValueError(f"{name}: logits are empty")
  for arr_name, arr in (extra or {}).items():
    if jnp.shape(arr) != logits.shape:
      raise ValueError(f"{name}: {arr_name} must have the shape of logits {logits.shape}, "
                       f"got {jnp.shape(arr)}")
  invalid = check_input(
      lambda xp, y: xp.isnan(y.astype(xp.float32)).any(), targets,
      message=f"{name}: targets contain NaN; use -1 (or where=False) to ignore an entry")
  if max_target is not None:
    invalid = invalid | check_input(
        lambda xp, y: (y.astype(xp.float32) > max_target).any(), targets,
        message=(f"{name}: targets must be <= {max_target} (the IoU of a positive), "
                 "got a larger one"))
  s = logits.astype(jnp.float32).reshape(-1)
  # Targets closed over as constants would otherwise be constant-folded by XLA at compile
  # time, which is slower than computing on them.
  y = jax.lax.optimization_barrier(targets.astype(jnp.float32).reshape(-1))
  valid = y >= 0  # False for -1 and NaN
  if where is not None:
    valid = valid & check_where(where, logits.shape, name=name).reshape(-1)
  positive = valid & (y > 0)
  negative = valid & (y == 0)
  finite = jnp.all(jnp.isfinite(s) | ~valid)
  return Flat(s, y, positive, negative, finite, invalid)


def resolve_max_positives(max_positives, targets, *, name: str) -> int:
  """The static number of positive slots.

  Given explicitly it is used as is. Otherwise, for concrete targets it is the number of
  positives rounded up to a power of two (a few compilations at most); for traced targets it
  is the number of entries, which is always enough but makes the O(P log P) parts cost
  O(N log N): pass ``max_positives`` in training steps.
  """
  if max_positives is not None:
    if int(max_positives) < 1:
      raise ValueError(f"{name}: max_positives must be >= 1, got {max_positives}")
    count = None
    concrete_targets = concrete(targets)
    if concrete_targets is not None:
      count = int(np.sum(concrete_targets.astype(np.float32) > 0))
      if count > int(max_positives):
        raise ValueError(f"{name}: {count} positives exceed max_positives={int(max_positives)}")
    return int(max_positives)
  size = int(np.prod(jnp.shape(targets)))
  concrete_targets = concrete(targets)
  if concrete_targets is None:
    return size
  count = int(np.sum(concrete_targets.astype(np.float32) > 0))
  return min(size, 1 << max(3, (max(count, 1) - 1).bit_length()))


class Positives(NamedTuple):
  """Positives gathered into a static number of slots, sorted by ascending logit.

  Padding slots come last and repeat the largest positive logit, so that sorted order and
  thresholds are unaffected; their ``mask`` is False.
  """
  index: Array     # [P] int32 position in the flat input (0 for padding)
  logits: Array    # [P] float32, ascending
  targets: Array   # [P] float32 (0 for padding)
  mask: Array      # [P] bool
  count: Array     # [] int32 number of positives
  overflow: Array  # [] bool: more positives than slots


#: Row length of the two-level compaction in :func:`positive_indices`.
COMPACT_ROW = 128


def positive_indices(positive, slots: int):
  """``jnp.nonzero(positive, size=slots, fill_value=0)`` and the number of positives.

  Two levels instead of a prefix sum over all N entries: one reduction counts the positives of
  each row of ``COMPACT_ROW`` entries, and only the (at most ``slots``) rows that hold any are
  gathered and ranked, so the work beyond the reduction is O(slots · COMPACT_ROW).
  """
  n = positive.shape[0]
  rows = -(-n // COMPACT_ROW)
  grid = jnp.pad(positive, (0, rows * COMPACT_ROW - n)).reshape(rows, COMPACT_ROW)
  per_row = jnp.sum(grid, axis=1, dtype=jnp.int32)
  count = jnp.sum(per_row)
  kept_rows = min(rows, slots)
  (row,) = jnp.nonzero(per_row > 0, size=kept_rows, fill_value=0)
  row = row.astype(jnp.int32)
  real_row = jnp.arange(kept_rows) < jnp.sum(per_row > 0)
  members = grid[row] & real_row[:, None]
  in_row = jnp.cumsum(members, axis=1, dtype=jnp.int32) - 1
  row_start = jnp.cumsum(per_row[row] * real_row, dtype=jnp.int32) - per_row[row] * real_row
  slot = jnp.where(members, row_start[:, None] + in_row, slots)
  entry = row[:, None] * COMPACT_ROW + jnp.arange(COMPACT_ROW, dtype=jnp.int32)
  index = jnp.zeros(slots, jnp.int32).at[slot.reshape(-1)].set(entry.reshape(-1), mode="drop")
  return index, count


def gather_positives(flat: Flat, max_positives: int) -> Positives:
  index, count = positive_indices(flat.positive, max_positives)
  slot = jnp.arange(max_positives, dtype=jnp.int32)
  mask = slot < count
  s = jnp.where(mask, flat.logits[index], jnp.inf)
  order = jnp.argsort(s, stable=True)
  index, mask = index[order], mask[order]
  s = s[order]
  top = jnp.max(jnp.where(mask, s, -jnp.inf))
  s = jnp.where(mask, s, jnp.where(count > 0, top, 0.0))
  y = jnp.where(mask, flat.targets[index], 0.0)
  return Positives(index, s, y, mask, count, count > max_positives)


def finish(values, grad, flat: Flat, count, overflow):
  """Zero for no positives (``count == 0``); NaN for non-finite logits, invalid traced input or
  positive overflow."""
  bad = (~flat.finite) | flat.invalid | overflow
  empty = count == 0
  values = tuple(jnp.where(bad, jnp.nan, jnp.where(empty, 0.0, v)) for v in values)
  grad = jnp.where(bad, jnp.nan, jnp.where(empty, 0.0, grad))
  return values, grad
