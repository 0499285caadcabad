"""Ranking-based detection losses in pure JAX.

Imports only ``jax`` and ``numpy``. Every loss takes array arguments first and keyword-only
options, computes in float32 whatever the input dtype, and is safe under ``jax.jit``,
``jax.vmap`` and ``jax.grad``.
"""

from jaxrank.losses.balancing import (
  SelfBalanceState,
  alrp_balance_period,
  alrp_self_balance_init,
  alrp_self_balance_update,
  value_ratio_weight,
  weighted_mean,
)
from jaxrank.losses.bucketed import bucketed_ap_loss, bucketed_rank_sort_loss
from jaxrank.losses.classic import giou_loss, l1_loss, sigmoid_focal_loss, smooth_l1_loss
from jaxrank.losses.parameterized import (
  PRESETS,
  PAPParams,
  faster_rcnn_params_from_theta,
  grad_scale,
  knots_from_theta,
  parameterized_ap_loss,
  params_from_theta,
  piecewise_linear,
  reg_weight_from_theta,
  theta_from_faster_rcnn_params,
  theta_from_knots,
  theta_from_params,
  theta_from_reg_weight,
)
from jaxrank.losses.ranking import RankingErrors, alrp_loss, ap_loss, rank_sort_loss, ranking_errors

__all__ = [
    "PAPParams",
    "PRESETS",
    "RankingErrors",
    "SelfBalanceState",
    "alrp_balance_period",
    "alrp_loss",
    "alrp_self_balance_init",
    "alrp_self_balance_update",
    "ap_loss",
    "bucketed_ap_loss",
    "bucketed_rank_sort_loss",
    "faster_rcnn_params_from_theta",
    "giou_loss",
    "grad_scale",
    "knots_from_theta",
    "l1_loss",
    "parameterized_ap_loss",
    "params_from_theta",
    "piecewise_linear",
    "rank_sort_loss",
    "ranking_errors",
    "reg_weight_from_theta",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "theta_from_faster_rcnn_params",
    "theta_from_knots",
    "theta_from_params",
    "theta_from_reg_weight",
    "value_ratio_weight",
    "weighted_mean",
]
