"""Gradient clipping (``optimizer.grad_clip_norm``) in the optimiser of jaxrank/train/optim.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank.train import config as config_lib
from jaxrank.train import optim

LR = 0.1


def sgd(clip, *, weight_decay=0.0, momentum=0.9):
  o = config_lib.base_config().optimizer
  o.update(name="sgd", lr=LR, momentum=momentum, weight_decay=weight_decay, warmup_steps=0,
           schedule="constant", grad_clip_norm=clip)
  tx, _ = optim.build_optimizer(o, global_batch_size=1, total_steps=10, steps_per_epoch=1)
  return tx


def first_update(tx, grads, params):
  updates, _ = tx.update(grads, tx.init(params), params)
  return {k: np.asarray(v, np.float64) for k, v in updates.items()}


# Global norm 13 over two leaves: sqrt(3^2 + 4^2 + 12^2).
PARAMS = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
GRADS = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}
NORM = 13.0


@pytest.mark.parametrize("clip", [1.0, 6.5])
def test_clipping_scales_the_update_by_clip_over_global_norm(clip):
  clipped = first_update(sgd(clip), GRADS, PARAMS)
  unclipped = first_update(sgd(0.0), GRADS, PARAMS)
  for key in GRADS:
    np.testing.assert_allclose(unclipped[key], -LR * np.asarray(GRADS[key]), rtol=1e-6)
    np.testing.assert_allclose(clipped[key], unclipped[key] * (clip / NORM), rtol=1e-6)


def test_clipping_above_the_norm_changes_nothing():
  clipped = first_update(sgd(2 * NORM), GRADS, PARAMS)
  unclipped = first_update(sgd(0.0), GRADS, PARAMS)
  for key in GRADS:
    np.testing.assert_allclose(clipped[key], unclipped[key], rtol=1e-7)


def test_zero_turns_clipping_off():
  huge = {k: 1e6 * v for k, v in GRADS.items()}
  updates = first_update(sgd(0.0), huge, PARAMS)
  for key in GRADS:
    np.testing.assert_allclose(updates[key], -LR * 1e6 * np.asarray(GRADS[key]), rtol=1e-6)


def test_clipping_comes_before_weight_decay():
  """torch: clip_grad_norm_ on the gradients, then SGD adds wd * p inside step()."""
  wd, clip = 0.01, 1.0
  updates = first_update(sgd(clip, weight_decay=wd), GRADS, PARAMS)
  for key in GRADS:
    expected = -LR * (np.asarray(GRADS[key]) * clip / NORM + wd * np.asarray(PARAMS[key]))
    np.testing.assert_allclose(updates[key], expected, rtol=1e-6)


def test_clipped_momentum_over_two_steps():
  """Each step's gradient is clipped before it enters the momentum buffer."""
  tx = sgd(1.0, momentum=0.9)
  state = tx.init(PARAMS)
  second = {k: 0.5 * v for k, v in GRADS.items()}  # norm 6.5
  buffer = {k: np.zeros(np.shape(v)) for k, v in PARAMS.items()}
  for grads, norm in ((GRADS, NORM), (second, NORM / 2)):
    updates, state = tx.update(grads, state, PARAMS)
    for key in grads:
      buffer[key] = 0.9 * buffer[key] + np.asarray(grads[key]) / norm
      np.testing.assert_allclose(updates[key], -LR * buffer[key], rtol=1e-6)
