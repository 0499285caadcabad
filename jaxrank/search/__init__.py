"""Search of the Parameterized AP Loss functions (Tao et al., NeurIPS 2021).

:mod:`jaxrank.search.policy` holds the truncated-normal policy and its PPO-style update; the
parameter vector maps to loss functions with :func:`jaxrank.losses.params_from_theta`. Uses
``optax``.
"""

from jaxrank.search.policy import (SearchState, init_search_state, log_prob, lr_schedule, policy_mean,
                                   ppo_objective, run_search, sample, sigma_schedule, update_policy)

__all__ = [
    "SearchState",
    "init_search_state",
    "log_prob",
    "lr_schedule",
    "policy_mean",
    "ppo_objective",
    "run_search",
    "sample",
    "sigma_schedule",
    "update_policy",
]
