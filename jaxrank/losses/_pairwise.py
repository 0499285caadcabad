"""Blocked positive-positive sums for the sorting part of RS (internal).

Positives are sorted by ascending logit and padded to a multiple of the block size. Only the
blocks that hold real positives are visited (loop bounds depend on the positive count), and
column blocks where the smoothed step is identically zero are skipped, so the cost is
O(P_real^2) time and O(P + block^2) memory whatever the number of slots.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxrank.losses._ramp import searchsorted

BLOCK = 256


def block_size(slots: int) -> int:
  return min(BLOCK, max(8, -(-slots // 8) * 8))


def pad_to_blocks(x, block: int, fill):
  pad = -x.shape[0] % block
  if not pad:
    return x
  return jnp.concatenate([x, jnp.full((pad,), fill, x.dtype)])


def row_sums(kernel: Callable, num_outputs: int, logits, columns, count, *, block: int,
             lower_reach: float | None = None, upper_reach: float | None = None,
             first_row=0, num_rows: int | None = None):
  """``out[r][i] = Σ_k kernel(rows_i, cols_k)[r]`` over real positives ``k``.

  Args:
    kernel: ``(row_logits [B], row_data, col_logits [B], col_data) -> tuple of [B, B]``.
    num_outputs: length of that tuple.
    logits: ``[Pp]`` ascending logits, ``Pp`` a multiple of ``block``.
    columns: pytree of ``[Pp]`` arrays sliced alongside (also passed as row data), or a function
      ``start -> pytree of [B]`` that makes the data of the block at ``start``.
    count: number of real positives (the rest are padding, masked by the kernel's data).
    lower_reach: columns with logit below ``row_min - lower_reach`` contribute 0.
    upper_reach: columns with logit above ``row_max + upper_reach`` contribute 0.
    first_row, num_rows: only the rows ``[first_row, first_row + num_rows)`` (multiples of
      ``block``; ``num_rows`` static, all rows by default); the outputs are ``[num_rows]``.
  """
  num_blocks = (count + block - 1) // block
  num_rows = logits.shape[0] if num_rows is None else num_rows
  if callable(columns):
    take = columns
  else:
    take = lambda start: jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, block),
                                      columns)
  first_block = first_row // block

  def row_body(r, outs):
    start = r * block
    row_logits = lax.dynamic_slice_in_dim(logits, start, block)
    row_data = take(start)
    first = 0
    last = num_blocks
    if lower_reach is not None:
      first = searchsorted(logits, row_logits[0] - lower_reach, "left") // block
    if upper_reach is not None:
      last_row = jnp.minimum(start + block, count) - 1
      reach = searchsorted(logits, logits[last_row] + upper_reach, "right")
      last = jnp.minimum(num_blocks, (reach + block - 1) // block)

    def col_body(c, acc):
      col_start = c * block
      parts = kernel(row_logits, row_data, lax.dynamic_slice_in_dim(logits, col_start, block),
                     take(col_start))
      return tuple(a + p.sum(axis=1) for a, p in zip(acc, parts))

    zero = tuple(jnp.zeros(block, jnp.float32) for _ in range(num_outputs))
    acc = lax.fori_loop(first, last, col_body, zero)
    return tuple(lax.dynamic_update_slice_in_dim(o, a, start - first_row, 0)
                 for o, a in zip(outs, acc))

  outs = tuple(jnp.zeros(num_rows, jnp.float32) for _ in range(num_outputs))
  last_block = jnp.minimum(num_blocks, first_block + num_rows // block)
  return lax.fori_loop(first_block, last_block, row_body, outs)
