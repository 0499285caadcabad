"""The element-wise baseline losses against hand and NumPy values; jaxrank.losses needs no optax."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank import losses


def np_focal(logits, labels, alpha=0.25, gamma=2.0):
  x = np.asarray(logits, np.float64)
  y = np.asarray(labels, np.float64)
  p = 1.0 / (1.0 + np.exp(-x))
  p_t = p * y + (1 - p) * (1 - y)
  ce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  loss = ce * (1 - p_t) ** gamma
  if alpha is not None:
    loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
  return loss


def test_smooth_l1_hand_values():
  pred = jnp.array([0.0, 0.5, -0.5, 1.0, 3.0, -2.0])
  target = jnp.zeros(6)
  # 0.5 x² / β inside |x| < β, |x| - β/2 outside
  np.testing.assert_allclose(losses.smooth_l1_loss(pred, target, beta=1.0),
                             [0.0, 0.125, 0.125, 0.5, 2.5, 1.5], rtol=1e-6)
  np.testing.assert_allclose(losses.smooth_l1_loss(pred, target + 1.0, beta=0.5),
                             [0.75, 0.25, 1.25, 0.0, 1.75, 2.75], rtol=1e-6)
  grad = jax.grad(lambda p: losses.smooth_l1_loss(p, jnp.zeros(4), beta=0.11).sum())(
      jnp.array([0.05, -0.05, 0.11, 2.0]))
  np.testing.assert_allclose(grad, [0.05 / 0.11, -0.05 / 0.11, 1.0, 1.0], rtol=1e-5)  # not 2 at β
  with pytest.raises(ValueError, match="beta"):
    losses.smooth_l1_loss(pred, target, beta=0.0)


def test_l1_hand_values_and_where():
  pred = jnp.array([[1.0, -2.0], [0.25, 4.0]])
  target = jnp.array([[0.5, 0.0], [0.25, -1.0]])
  np.testing.assert_allclose(losses.l1_loss(pred, target), [[0.5, 2.0], [0.0, 5.0]])
  where = jnp.array([[True, False], [True, True]])
  np.testing.assert_allclose(losses.l1_loss(pred, target, where=where), [[0.5, 0.0], [0.0, 5.0]])
  np.testing.assert_allclose(losses.smooth_l1_loss(pred, target, where=where),
                             [[0.125, 0.0], [0.0, 4.5]])
  value = losses.l1_loss(jnp.array([1, 2], jnp.bfloat16), jnp.array([0.0, 0.0]))
  assert value.dtype == jnp.float32


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 2.0), (0.5, 0.0), (0.25, 1.5)])
def test_focal_matches_numpy(alpha, gamma):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=50).astype(np.float32) * 3
  labels = (rng.random(50) < 0.3).astype(np.float32)
  labels[:5] = rng.random(5)  # soft labels
  out = losses.sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma)
  np.testing.assert_allclose(out, np_focal(logits, labels, alpha, gamma), rtol=2e-5, atol=1e-7)
  # gamma = 0, alpha = 0.5: half the binary cross-entropy
  if gamma == 0.0:
    np.testing.assert_allclose(out, 0.5 * np_focal(logits, labels, None, 0.0), rtol=2e-5)


def test_focal_gradient_and_where():
  logits = jnp.array([2.0, -1.0, 0.3])
  labels = jnp.array([1.0, 0.0, 1.0])
  grad = jax.grad(lambda x: losses.sigmoid_focal_loss(x, labels).sum())(logits)
  h = 1e-4
  numeric = [(np_focal(np.asarray(logits) + h * e, labels).sum()
              - np_focal(np.asarray(logits) - h * e, labels).sum()) / (2 * h) for e in np.eye(3)]
  np.testing.assert_allclose(grad, numeric, rtol=1e-3)
  masked = losses.sigmoid_focal_loss(logits, labels, where=jnp.array([True, False, True]))
  assert float(masked[1]) == 0.0 and float(masked[0]) > 0.0
  # huge logits stay finite (log-space focal weight)
  assert np.isfinite(losses.sigmoid_focal_loss(jnp.array([80.0, -80.0]),
                                               jnp.array([0.0, 1.0]))).all()


def test_matches_optax_when_installed():
  optax = pytest.importorskip("optax")
  rng = np.random.default_rng(1)
  x = rng.normal(size=40).astype(np.float32) * 2
  y = (rng.random(40) < 0.5).astype(np.float32)
  np.testing.assert_allclose(losses.sigmoid_focal_loss(x, y),
                             optax.sigmoid_focal_loss(x, y, alpha=0.25, gamma=2.0),
                             rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(losses.smooth_l1_loss(x, y, beta=0.11),
                             optax.huber_loss(x, y, delta=0.11) / 0.11, rtol=1e-6)


def test_losses_import_needs_only_jax_and_numpy():
  code = ("import sys, jaxrank.losses; print([m for m in sys.modules if m.split('.')[0] in "
          "('flax', 'optax', 'tensorflow', 'tensorflow_datasets', 'pycocotools')])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
  code = ("import sys, jax.numpy as jnp, jaxrank.losses as l; "
          "l.sigmoid_focal_loss(jnp.ones(2), jnp.ones(2));"
          "l.smooth_l1_loss(jnp.ones(2), jnp.zeros(2)); print('optax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.stdout.strip() == "False", out.stdout + out.stderr
