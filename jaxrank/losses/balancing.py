"""Loss balancing used with the ranking losses: pure functions usable inside a jitted step."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrank.losses._common import check_where

Array = jax.Array


def weighted_mean(values, weights, *, where=None, eps: float = 1e-12):
  """``Σ w·v / Σ w`` over ``where``; the denominator is 1 when ``Σ w < eps`` (as published).

  RS uses it for the box loss with ``w_i = max_c sigmoid(s_ic)`` (detached) of each positive.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxrank import losses
    >>> float(losses.weighted_mean(jnp.array([1.0, 3.0, 5.0]), jnp.array([1.0, 3.0, 0.0])))
    2.5
  """
  values = jnp.asarray(values, jnp.float32)
  weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), values.shape)
  if where is not None:
    where = check_where(where, name="weighted_mean")
    values = jnp.where(where, values, 0.0)
    weights = jnp.where(where, weights, 0.0)
  total = jnp.sum(weights)
  return jnp.sum(weights * values) / jnp.where(total < eps, 1.0, total)


def value_ratio_weight(reference_loss, loss, *, eps: float = 1e-12):
  """RS's balance ``λ = stop_gradient(reference_loss / loss)``, recomputed every step.

  ``total = L_RS + λ·L_box`` makes the box loss's *value* equal the RS value while keeping its
  gradient direction (Oksuz et al., 2021). Published heads divide by zero when ``loss = 0``;
  here ``λ = 1`` then (the box term is zero anyway).
  """
  reference_loss = lax.stop_gradient(jnp.asarray(reference_loss, jnp.float32))
  loss = lax.stop_gradient(jnp.asarray(loss, jnp.float32))
  ok = loss > eps
  return jnp.where(ok, reference_loss / jnp.where(ok, loss, 1.0), 1.0)


class SelfBalanceState(NamedTuple):
  """aLRP's self-balance state: the current weight and running sums of the loss values."""
  weight: Array      # [] float32, multiplies the localisation loss
  cls_sum: Array     # [] float32
  loc_sum: Array     # [] float32
  count: Array       # [] int32, steps accumulated in this period


def alrp_self_balance_init(initial_weight: float = 50.0) -> SelfBalanceState:
  """The published start: ``w_SB = 50``, empty histories."""
  zero = jnp.zeros((), jnp.float32)
  return SelfBalanceState(jnp.asarray(initial_weight, jnp.float32), zero, zero,
                          jnp.zeros((), jnp.int32))


def alrp_balance_period(num_train_images: int, global_batch_size: int) -> int:
  """Steps in one epoch: the published period (3665 = ceil(117266 / 32) for COCO at batch 32)."""
  if num_train_images < 1 or global_batch_size < 1:
    raise ValueError(f"need positive sizes, got {num_train_images} images "
                     f"and batch {global_batch_size}")
  return math.ceil(num_train_images / global_batch_size)


def alrp_self_balance_update(state: SelfBalanceState, cls_loss, loc_loss, *,
                             period: int) -> SelfBalanceState:
  r"""Accumulates one step's loss values; every ``period`` steps sets

  .. math:: w_{SB} = \frac{\overline{L_{loc}} + \overline{L_{cls}}}{\overline{L_{loc}}}

  over that period (``L_loc`` before multiplication by ``w_SB``) and clears the sums (Oksuz et
  al., 2020, section 4). Values only: no gradient flows. The weight is kept when the mean
  localisation loss is 0.
  """
  if period < 1:
    raise ValueError(f"period must be >= 1, got {period}")
  cls_sum = state.cls_sum + lax.stop_gradient(jnp.asarray(cls_loss, jnp.float32))
  loc_sum = state.loc_sum + lax.stop_gradient(jnp.asarray(loc_loss, jnp.float32))
  count = state.count + 1
  due = count >= period
  new_weight = jnp.where(loc_sum > 0, (loc_sum + cls_sum) / jnp.where(loc_sum > 0, loc_sum, 1.0),
                         state.weight)
  zero = jnp.zeros((), jnp.float32)
  return SelfBalanceState(
      weight=jnp.where(due, new_weight, state.weight),
      cls_sum=jnp.where(due, zero, cls_sum),
      loc_sum=jnp.where(due, zero, loc_sum),
      count=jnp.where(due, 0, count),
  )
