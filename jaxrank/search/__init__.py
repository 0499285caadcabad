"""Search of the Parameterized AP Loss functions (Tao et al., NeurIPS 2021).

:mod:`jaxrank.search.policy` holds the truncated-normal policy and its PPO-style update;
:mod:`jaxrank.search.space` maps the parameter vector to the proxy's loss state (41 numbers
for RetinaNet, :func:`jaxrank.losses.params_from_theta`; 82 for Faster R-CNN's two heads,
:func:`jaxrank.losses.faster_rcnn_params_from_theta`).
:mod:`jaxrank.search.proxy` trains the proxies of a round (vmapped over the loss parameters, or
one after another), :mod:`jaxrank.search.runner` is the loop with per-round checkpoints and
outputs, and ``python -m jaxrank.search`` its command line. The policy needs ``optax``; the
proxies need the ``[train]`` extra.
"""

from jaxrank.search.policy import (
  SearchState,
  init_search_state,
  log_prob,
  lr_schedule,
  policy_mean,
  ppo_objective,
  run_search,
  sample,
  sigma_schedule,
  update_policy,
)

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
