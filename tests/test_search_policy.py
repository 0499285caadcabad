"""PAP search policy (spec §6.4): truncated normal on [0, 1] and the PPO-style update."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank import search
from jaxrank.losses import parameterized as pap
from jaxrank.search import policy


def _logit(p):
  p = np.asarray(p, np.float64)
  return np.log(p) - np.log1p(-p)


def np_log_prob(theta, mean, sigma):
  """Published `TruncatedNormal.log_prob` on [0, 1], float64."""
  cdf = lambda z: 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
  z = (theta - mean) / sigma
  mass = cdf((1 - mean) / sigma) - cdf(-mean / sigma)
  lp = -0.5 * z**2 - 0.5 * math.log(2 * math.pi) - np.log(sigma) - np.log(mass)
  return np.where((theta >= 0) & (theta <= 1), lp, -np.inf)


def test_sample_in_unit_interval_and_deterministic():
  mean = np.array([0.02, 0.5, 0.97, 0.3])
  sigma = np.array([0.2, 0.2, 0.05, 0.0])
  key = jax.random.PRNGKey(0)
  a = np.asarray(search.sample(key, _logit(mean), sigma, 4000))
  b = np.asarray(search.sample(key, _logit(mean), sigma, 4000))
  assert a.shape == (4000, 4)
  np.testing.assert_array_equal(a, b)
  assert (a >= 0).all() and (a <= 1).all()
  np.testing.assert_allclose(a[:, 3], 0.3, rtol=1e-6)  # sigma 0: the mean
  assert not np.array_equal(
      a, np.asarray(search.sample(jax.random.PRNGKey(1), _logit(mean), sigma, 4000)))
  # the sample mean matches the truncated normal's mean (numerical integration of the density)
  grid = np.linspace(0, 1, 20001)
  for d in range(3):
    density = np.exp(np_log_prob(grid, mean[d], sigma[d]))
    expected = np.trapezoid(grid * density, grid)
    assert a[:, d].mean() == pytest.approx(
        expected, abs=float(4 * a[:, d].std() / math.sqrt(4000)) + 1e-3)


def test_log_prob_matches_formula_and_normalises():
  grid = np.linspace(0, 1, 4001)
  for mean, sigma in [(0.5, 0.2), (0.05, 0.2), (0.9, 0.03), (0.3, 1.0)]:
    lp = np.asarray(search.log_prob(grid[:, None], _logit([mean]), np.float32(sigma)))[:, 0]
    np.testing.assert_allclose(lp, np_log_prob(grid, mean, sigma), rtol=1e-4, atol=1e-4)
    assert np.trapezoid(np.exp(lp), grid) == pytest.approx(1.0, abs=2e-3)
  outside = search.log_prob(np.array([[-0.01], [1.01]]), _logit([0.5]), 0.2)
  assert np.isneginf(np.asarray(outside)).all()
  # differentiable w.r.t. the logit-space mean
  g = jax.grad(lambda mu: search.log_prob(jnp.array([0.7]), mu, 0.2).sum())(jnp.array([0.0]))
  assert float(g[0]) > 0  # moving the mean towards 0.7 raises its density


def test_sigma_schedule_and_lr_schedule():
  state = search.init_search_state(np.full(3, 0.5), num_rounds=4)
  np.testing.assert_allclose(state.sigma, 0.2)
  np.testing.assert_allclose(search.policy_mean(state), 0.5, rtol=1e-6)
  thetas = np.random.default_rng(0).uniform(0, 1, (8, 3))
  rewards = np.zeros(8)
  sigmas = []
  for _ in range(4):
    state = search.update_policy(state, thetas, rewards)
    sigmas.append(float(state.sigma[0]))
  # σ_t = σ0 (T - t) / T; the last round keeps σ (published hack: never 0)
  np.testing.assert_allclose(sigmas, [0.15, 0.1, 0.05, 0.05], rtol=1e-6)
  assert int(state.round) == 4
  schedule = np.asarray(search.sigma_schedule(0.2, np.arange(41), 40))
  np.testing.assert_allclose(schedule[[0, 10, 40]], [0.2, 0.15, 0.0])
  # zero advantages: mean unchanged
  np.testing.assert_allclose(search.policy_mean(state), 0.5, rtol=1e-6)
  lr = search.lr_schedule(0.01, 100, 30)
  np.testing.assert_allclose([float(lr(k)) for k in (0, 15, 30, 65, 99)],
                             [0.0, 0.005, 0.01, 0.005, 0.01 / 70], rtol=1e-5)


def test_ppo_objective_clips_per_dimension():
  rng = np.random.default_rng(1)
  thetas = rng.uniform(0, 1, (6, 4))
  adv = rng.normal(size=6)
  mu_old = _logit(rng.uniform(0.3, 0.7, 4))
  mu_new = mu_old + rng.normal(scale=0.3, size=4)
  old = np_log_prob(thetas, 1 / (1 + np.exp(-mu_old)), 0.2)
  got = search.ppo_objective(mu_new, thetas, adv, old, 0.15, clip_eps=0.1)
  diff = np_log_prob(thetas, 1 / (1 + np.exp(-mu_new)), 0.15) - old
  r = np.exp(diff.sum(-1))
  r_clip = np.exp(np.clip(diff, np.log(0.9), np.log(1.1)).sum(-1))
  assert float(got) == pytest.approx(np.mean(np.minimum(r * adv, r_clip * adv)), rel=1e-4)
  # per-dimension clipping differs from clipping the summed ratio
  summed = np.exp(np.clip(diff.sum(-1), 4 * np.log(0.9), 4 * np.log(1.1)))
  assert not np.allclose(r_clip, summed)


def test_update_moves_mean_towards_high_reward():
  target = np.array([0.8, 0.3, 0.65])
  reward_fn = lambda th: -jnp.abs(th - target).sum(-1)
  state = search.init_search_state(np.full(3, 0.5), num_rounds=40)
  # one update from a fixed batch: every coordinate moves towards its optimum
  thetas = search.sample(jax.random.PRNGKey(0), state.mu_logit, state.sigma, 8)
  one = search.update_policy(state, thetas, reward_fn(thetas))
  moved = np.asarray(search.policy_mean(one)) - 0.5
  assert (np.sign(moved) == np.sign(target - 0.5)).all()
  assert float(one.best_reward) == pytest.approx(float(reward_fn(thetas).max()))
  np.testing.assert_allclose(one.best_theta, thetas[int(jnp.argmax(reward_fn(thetas)))])
  # a few rounds: the mean gets much closer
  final = search.run_search(jax.random.PRNGKey(1), reward_fn, state, num_samples=8, num_rounds=8)
  assert int(final.round) == 8
  before = np.abs(0.5 - target).sum()
  after = np.abs(np.asarray(search.policy_mean(final)) - target).sum()
  assert after < 0.5 * before
  # deterministic given keys
  again = search.run_search(jax.random.PRNGKey(1), reward_fn, state, num_samples=8, num_rounds=8)
  np.testing.assert_array_equal(again.mu_logit, final.mu_logit)


def test_published_initial_state_for_one_pap_head():
  mean = list(pap.IDENTITY_THETA) * 5 + [0.5]
  state = search.init_search_state(mean)
  assert state.mu_logit.shape == (41,) and int(state.num_rounds) == 40
  from jaxrank import losses
  params = losses.params_from_theta(search.policy_mean(state))
  np.testing.assert_allclose(params.h2, losses.PRESETS["identity"].h2, atol=1e-5)
  assert float(params.grad_scale) == pytest.approx(1.0, rel=1e-5)
  with pytest.raises(ValueError):
    search.update_policy(state, np.zeros((8, 40)), np.zeros(8))
  assert policy.CLIP_EPS == 0.1 and policy.NUM_STEPS == 100 and policy.LEARNING_RATE == 0.01
