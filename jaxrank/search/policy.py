r"""The Parameterized AP Loss search policy and its PPO-style update, as in the published
``tools/search.py`` (Tao et al., NeurIPS 2021).

Every searched number ``θ_d ∈ [0, 1]`` (41 for one RetinaNet head, see
:func:`jaxrank.losses.params_from_theta`) has an independent truncated normal policy on
``[0, 1]`` with mean ``sigmoid(μ_d)`` and standard deviation ``σ_t = σ_0 (T - t) / T`` (not
learned; ``σ_0 = 0.2``, ``T = 40`` rounds). Each round samples ``K = 8`` parameter vectors,
trains and evaluates a proxy detector for each (the reward ``R_k``, COCO box mAP), then updates
``μ`` by maximising the clipped surrogate

.. math::
   A_k = R_k - \bar R, \quad
   \rho_{kd} = \log\pi_{new}(θ_{kd}) - \log\pi_{old}(θ_{kd}), \quad
   r_k = e^{\sum_d \rho_{kd}}, \quad
   \tilde r_k = e^{\sum_d \mathrm{clip}(\rho_{kd}, \log(1-ε), \log(1+ε))},

   J(μ) = \frac1K \sum_k \min(r_k A_k, \tilde r_k A_k)

with 100 Adam steps (lr 0.01, linear warmup over steps 0-30 from 0, then linear decay towards 0
at step 100). ``π_old`` uses the round's σ and the round's μ; ``π_new`` the decayed σ and the
current μ. Everything here is a pure function of arrays and PRNG keys.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import ndtr

Array = jax.Array

SIGMA0 = 0.2
NUM_ROUNDS = 40
NUM_SAMPLES = 8
CLIP_EPS = 0.1
LEARNING_RATE = 0.01
NUM_STEPS = 100
WARMUP_STEPS = 30
#: Initial means are clipped to ``[MEAN_EPS, 1 - MEAN_EPS]`` before the logit.
MEAN_EPS = 1e-6


class SearchState(NamedTuple):
  """State of the search (a pytree).

  Attributes:
    mu_logit: ``[D]`` policy means in logit space; the mean is ``sigmoid(mu_logit)``.
    sigma: ``[D]`` the standard deviation to sample this round with, ``σ_0 (T - t) / T``.
    sigma0: ``[D]`` initial standard deviation.
    round: ``[]`` int32, rounds completed ``t``.
    num_rounds: ``[]`` int32, ``T``.
    best_theta: ``[D]`` best sample seen so far (the initial mean before any round).
    best_reward: ``[]`` its reward (``-inf`` before any round).
    mean_reward: ``[]`` mean reward of the last round (NaN before any round).
  """
  mu_logit: Array
  sigma: Array
  sigma0: Array
  round: Array
  num_rounds: Array
  best_theta: Array
  best_reward: Array
  mean_reward: Array


def sigma_schedule(sigma0, t, num_rounds):
  """``σ_t = σ_0 (T - t) / T``."""
  return jnp.asarray(sigma0, jnp.float32) * (num_rounds - t) / num_rounds


def init_search_state(initial_theta, *, sigma0=SIGMA0, num_rounds: int = NUM_ROUNDS) -> SearchState:
  """A fresh search from the mean ``initial_theta`` ``[D]`` in ``(0, 1)``.

  The published initial mean for one PAP head is ``[0.2, 0.2, 0.25, 0.25, 0.3333, 0.3333, 0.5,
  0.5] * 5 + [0.5]`` (identity functions, gradient scale 1), ``σ_0 = 0.2``, ``T = 40``.
  """
  theta = jnp.asarray(initial_theta, jnp.float32)
  if theta.ndim != 1:
    raise ValueError(f"initial_theta must be a vector, got shape {theta.shape}")
  if int(num_rounds) < 1:
    raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
  mean = jnp.clip(theta, MEAN_EPS, 1.0 - MEAN_EPS)
  sigma0 = jnp.broadcast_to(jnp.asarray(sigma0, jnp.float32), theta.shape)
  return SearchState(
      mu_logit=jnp.log(mean) - jnp.log1p(-mean),
      sigma=sigma0,
      sigma0=sigma0,
      round=jnp.zeros((), jnp.int32),
      num_rounds=jnp.asarray(num_rounds, jnp.int32),
      best_theta=theta,
      best_reward=jnp.asarray(-jnp.inf, jnp.float32),
      mean_reward=jnp.asarray(jnp.nan, jnp.float32),
  )


def policy_mean(state_or_mu_logit) -> Array:
  """The policy mean ``sigmoid(μ)`` ``[D]``: the searched parameters after the last round."""
  mu = (state_or_mu_logit.mu_logit if isinstance(state_or_mu_logit, SearchState)
        else state_or_mu_logit)
  return jax.nn.sigmoid(jnp.asarray(mu, jnp.float32))


@partial(jax.jit, static_argnames=("num_samples",))
def sample(key, mu_logit, sigma, num_samples: int) -> Array:
  """``[num_samples, D]`` draws of the truncated normal policy on ``[0, 1]``.

  Same distribution as the published inverse-CDF sampler (``jax.random.truncated_normal``,
  which is accurate in the tails); ``σ = 0`` gives the mean. Deterministic given ``key``.
  """
  mean = policy_mean(mu_logit)
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), mean.shape)
  positive = sigma > 0
  safe = jnp.where(positive, sigma, 1.0)
  z = jax.random.truncated_normal(key, -mean / safe, (1.0 - mean) / safe,
                                  (int(num_samples),) + mean.shape)
  return jnp.clip(jnp.where(positive, mean + safe * z, mean), 0.0, 1.0)


@jax.jit
def log_prob(theta, mu_logit, sigma) -> Array:
  r"""Per-dimension log density of the truncated normal policy, ``[..., D]``:

  .. math::
     \log\pi(θ) = \log\phi\left(\frac{θ - μ}{σ}\right) - \log σ
                  - \log\left(\Phi\left(\frac{1 - μ}{σ}\right) - \Phi\left(\frac{-μ}{σ}\right)\right),

  ``-inf`` outside ``[0, 1]``; ``μ = sigmoid(mu_logit)``, ``σ > 0``. Differentiable w.r.t.
  ``mu_logit``. Sum over the last axis for the log-probability of a vector.
  """  # noqa: E501
  theta = jnp.asarray(theta, jnp.float32)
  mean = policy_mean(mu_logit)
  sigma = jnp.asarray(sigma, jnp.float32)
  z = (theta - mean) / sigma
  mass = ndtr((1.0 - mean) / sigma) - ndtr(-mean / sigma)
  lp = -0.5 * z * z - 0.5 * jnp.log(2.0 * jnp.pi) - jnp.log(sigma) - jnp.log(mass)
  return jnp.where((theta >= 0) & (theta <= 1), lp, -jnp.inf)


def ppo_objective(mu_logit, thetas, advantages, old_log_prob, sigma, *,
                  clip_eps: float = CLIP_EPS) -> Array:
  """``mean_k min(r_k A_k, r̃_k A_k)`` (to be maximised); the ratio is clipped per dimension in
  log space before the sum over dimensions, as published."""
  diff = log_prob(thetas, mu_logit, sigma) - old_log_prob
  ratio = jnp.exp(jnp.sum(diff, axis=-1))
  clipped = jnp.exp(jnp.sum(jnp.clip(diff, jnp.log1p(-clip_eps), jnp.log1p(clip_eps)), axis=-1))
  return jnp.mean(jnp.minimum(ratio * advantages, clipped * advantages))


def lr_schedule(learning_rate: float = LEARNING_RATE, num_steps: int = NUM_STEPS,
                warmup_steps: int = WARMUP_STEPS) -> Callable[[Array], Array]:
  """The published ``LambdaLR``: ``lr · k / w`` for ``k <= w``, then ``lr · (1 - (k - w) / (n -
  w))`` (step 0 has learning rate 0; step ``n - 1`` has ``lr / (n - w)``)."""
  w, n = int(warmup_steps), int(num_steps)

  def schedule(count):
    k = (jnp.asarray(count, jnp.float32) % n)
    warm = k / w if w > 0 else jnp.ones_like(k)
    decay = 1.0 - (k - w) / max(n - w, 1)
    return learning_rate * jnp.where(k <= w, warm, decay)
  return schedule


@partial(jax.jit, static_argnames=("clip_eps", "learning_rate", "num_steps", "warmup_steps"))
def _ppo_update(mu_logit, thetas, advantages, old_sigma, new_sigma, *, clip_eps, learning_rate,
                num_steps, warmup_steps):
  old = jax.lax.stop_gradient(log_prob(thetas, mu_logit, old_sigma))
  optimizer = optax.adam(lr_schedule(learning_rate, num_steps, warmup_steps))
  loss = lambda mu: -ppo_objective(mu, thetas, advantages, old, new_sigma, clip_eps=clip_eps)

  def step(carry, _):
    mu, opt_state = carry
    value, grad = jax.value_and_grad(loss)(mu)
    updates, opt_state = optimizer.update(grad, opt_state, mu)
    return (optax.apply_updates(mu, updates), opt_state), -value

  (mu, _), objective = jax.lax.scan(step, (mu_logit, optimizer.init(mu_logit)), None,
                                    length=num_steps)
  return mu, objective


def update_policy(state: SearchState, thetas, rewards, *, clip_eps: float = CLIP_EPS,
                  learning_rate: float = LEARNING_RATE, num_steps: int = NUM_STEPS,
                  warmup_steps: int = WARMUP_STEPS) -> SearchState:
  """One round's update from the sampled ``thetas`` ``[K, D]`` and their ``rewards`` ``[K]``.

  ``A_k = R_k - mean(R)``; ``π_old`` uses ``state.sigma`` and ``state.mu_logit``; ``π_new`` uses
  the decayed ``σ_{t+1} = σ_0 (T - t - 1) / T`` (kept at ``σ_t`` when it would be 0, i.e. in the
  last round, as published) and the μ being optimised, for ``num_steps`` Adam steps on the
  negated clipped surrogate (:func:`ppo_objective`, :func:`lr_schedule`). Returns the state of
  round ``t + 1``. Replace a NaN reward by 0 first (the published search scores a failed run 0).
  """
  thetas = jnp.asarray(thetas, jnp.float32)
  rewards = jnp.asarray(rewards, jnp.float32).reshape(-1)
  if (thetas.ndim != 2 or thetas.shape[1:] != state.mu_logit.shape
      or thetas.shape[0] != rewards.shape[0]):
    raise ValueError(f"thetas must be [K, {state.mu_logit.shape[0]}] and rewards [K], got "
                     f"{thetas.shape} and {rewards.shape}")
  return _update_policy(state, thetas, rewards, clip_eps=float(clip_eps),
                        learning_rate=float(learning_rate), num_steps=int(num_steps),
                        warmup_steps=int(warmup_steps))


@partial(jax.jit, static_argnames=("clip_eps", "learning_rate", "num_steps", "warmup_steps"))
def _update_policy(state: SearchState, thetas, rewards, *, clip_eps, learning_rate, num_steps,
                   warmup_steps):
  advantages = rewards - jnp.mean(rewards)
  new_sigma = sigma_schedule(state.sigma0, state.round + 1, state.num_rounds)
  new_sigma = jnp.where(jnp.sum(new_sigma) == 0, state.sigma, new_sigma)
  mu, _ = _ppo_update(state.mu_logit, thetas, advantages, state.sigma, new_sigma, clip_eps=clip_eps,
                      learning_rate=learning_rate, num_steps=num_steps, warmup_steps=warmup_steps)
  best = jnp.argmax(rewards)
  improved = rewards[best] > state.best_reward
  return SearchState(
      mu_logit=mu,
      sigma=new_sigma,
      sigma0=state.sigma0,
      round=state.round + 1,
      num_rounds=state.num_rounds,
      best_theta=jnp.where(improved, thetas[best], state.best_theta),
      best_reward=jnp.where(improved, rewards[best], state.best_reward),
      mean_reward=jnp.mean(rewards),
  )


def run_search(key, reward_fn: Callable[[Array], Array], state: SearchState, *,
               num_samples: int = NUM_SAMPLES, num_rounds: int | None = None,
               **update_kwargs) -> SearchState:
  """Runs rounds until ``state.round == state.num_rounds`` (or ``num_rounds`` more rounds):
  sample ``num_samples`` vectors, score them with ``reward_fn(thetas [K, D]) -> [K]`` (a
  Python callable: in the real search, proxy training runs), update. NaN rewards count as 0.
  """
  remaining = int(state.num_rounds) - int(state.round)
  rounds = remaining if num_rounds is None else min(int(num_rounds), remaining)
  for _ in range(rounds):
    key, sub = jax.random.split(key)
    thetas = sample(sub, state.mu_logit, state.sigma, num_samples)
    rewards = jnp.nan_to_num(jnp.asarray(reward_fn(thetas), jnp.float32), nan=0.0)
    state = update_policy(state, thetas, rewards, **update_kwargs)
  return state
