"""Hungarian (optimal one-to-one) matching of queries to ground truth, as DETR's matcher.

``HungarianMatcher`` of DETR (Carion et al., ECCV 2020) and Deformable DETR runs
``scipy.optimize.linear_sum_assignment`` per image on the real ground truth; here the ground
truth is padded to a static ``G`` and the assignment is ``optax.assignment.
hungarian_algorithm`` (jit- and vmap-able; ``O(min(Q, G) * max(Q, G)^2)`` per image at worst,
a vmapped batch runs until its slowest image is done). optax is imported on the first call,
so ``jaxrank.ops`` itself needs only jax and numpy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

#: Finite real costs are clipped to +-this before they are rescaled (no overflow).
COST_CLIP = 1e30


class Matching(NamedTuple):
  """Result of :func:`hungarian_match` for a batch (``B`` images, ``Q`` queries, ``G`` gt).

  Attributes:
    query_index: ``[B, G]`` int32, the query matched to each ground truth; 0 where not
      ``matched`` (so a gather stays in bounds).
    matched: ``[B, G]`` bool, the ground truth is real and got a query.
    gt_index: ``[B, Q]`` int32, the real ground truth matched to each query, -1 if none.
  """
  query_index: jax.Array
  matched: jax.Array
  gt_index: jax.Array


def _assignment_costs(cost, gt_mask):
  """``[Q, G]`` float32 costs whose optimal assignment is that of the real columns.

  Real entries are mapped to ``[0, 1]`` (shift and positive scale, so the optimum over the
  real columns is unchanged: every assignment matches the same number of them); -inf is -1,
  NaN and +inf are 2, padded columns are 3, larger than every real entry.
  """
  real = jnp.broadcast_to(gt_mask[None, :], cost.shape)
  finite = real & jnp.isfinite(cost)
  clipped = jnp.clip(cost, -COST_CLIP, COST_CLIP)
  low = jnp.min(jnp.where(finite, clipped, jnp.inf), initial=jnp.inf)
  high = jnp.max(jnp.where(finite, clipped, -jnp.inf), initial=-jnp.inf)
  low = jnp.where(jnp.isfinite(low), low, 0.0)
  span = jnp.where(high > low, high - low, 1.0)
  scaled = (clipped - low) / span
  scaled = jnp.where(cost == -jnp.inf, -1.0, jnp.where(finite, scaled, 2.0))
  return jnp.where(real, scaled, 3.0)


def _match_one(cost, gt_mask):
  from optax.assignment import hungarian_algorithm

  num_queries, num_gt = cost.shape
  query, gt = hungarian_algorithm(_assignment_costs(cost, gt_mask))
  query, gt = query.astype(jnp.int32), gt.astype(jnp.int32)
  assigned = jnp.zeros(num_gt, bool).at[gt].set(True)
  query_index = jnp.zeros(num_gt, jnp.int32).at[gt].set(query)
  matched = assigned & gt_mask
  gt_for_query = jnp.where(gt_mask[gt], gt, -1)
  gt_index = jnp.full(num_queries, -1, jnp.int32).at[query].set(gt_for_query)
  return Matching(jnp.where(matched, query_index, 0), matched, gt_index)


def hungarian_match(cost, gt_mask) -> Matching:
  """Optimal one-to-one assignment of each image's real ground truth to its queries.

  Args:
    cost: ``[B, Q, G]`` float matching cost of query ``q`` for ground truth ``g`` (e.g.
      DETR's ``class + L1 + GIoU`` cost); under ``stop_gradient``.
    gt_mask: ``[B, G]`` bool, the real (not padded) ground truth.

  Returns:
    :class:`Matching`. Per image, ``min(Q, number of real gt)`` real ground truth are
    matched, with the least total cost over the real columns (the optimum of
    ``scipy.optimize.linear_sum_assignment`` on them; ties broken arbitrarily). Padded
    columns and their cost values never change the real assignment: they cost more than any
    real entry, so when ``G > Q`` the queries go to real ground truth first. A real entry
    that is NaN or +inf costs more than every finite one (used only when nothing else is
    left) and -inf less than every finite one; the result is always a valid assignment.
    Jit-able with static shapes; ``Q == 0`` or ``G == 0`` match nothing.
  """
  cost = jax.lax.stop_gradient(jnp.asarray(cost))
  gt_mask = jnp.asarray(gt_mask)
  if cost.ndim != 3 or not jnp.issubdtype(cost.dtype, jnp.floating):
    raise ValueError(f"cost must be a floating [B, Q, G] array, got {cost.dtype} "
                     f"{cost.shape}.")
  batch, num_queries, num_gt = cost.shape
  if gt_mask.shape != (batch, num_gt) or gt_mask.dtype != jnp.bool_:
    raise ValueError(f"gt_mask must be a bool [B, G] = {(batch, num_gt)} array, got "
                     f"{gt_mask.dtype} {gt_mask.shape}.")
  if num_queries == 0 or num_gt == 0:
    return Matching(jnp.zeros((batch, num_gt), jnp.int32), jnp.zeros((batch, num_gt), bool),
                    jnp.full((batch, num_queries), -1, jnp.int32))
  return jax.vmap(_match_one)(cost.astype(jnp.float32), gt_mask)
