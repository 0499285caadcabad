"""Ranking-based detection losses in pure JAX.

Imports only ``jax`` and ``numpy``. Every loss takes array arguments first and keyword-only
options, computes in float32 whatever the input dtype, and is safe under ``jax.jit``,
``jax.vmap`` and ``jax.grad``.
"""

from jaxrank.losses.bucketed import bucketed_ap_loss, bucketed_rank_sort_loss
from jaxrank.losses.ranking import RankingErrors, alrp_loss, ap_loss, rank_sort_loss, ranking_errors

__all__ = [
    "RankingErrors",
    "alrp_loss",
    "ap_loss",
    "bucketed_ap_loss",
    "bucketed_rank_sort_loss",
    "rank_sort_loss",
    "ranking_errors",
]
