"""Shared by the detector family tests: a small random batch and a cached jitted loss."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrank import models

SIZE = 64


def make_batch(num_boxes=(3, 2), seed=0, size=SIZE):
  """A batch of ``len(num_boxes)`` random ``size`` px images with that many random boxes."""
  rng = np.random.default_rng(seed)
  batch_size, max_boxes = len(num_boxes), 4
  xy = rng.uniform(0, 30, (batch_size, max_boxes, 2))
  wh = rng.uniform(10, 30, (batch_size, max_boxes, 2))
  mask = np.arange(max_boxes)[None, :] < np.asarray(num_boxes)[:, None]
  return {"image": jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32),
          "boxes": jnp.asarray(np.where(mask[..., None], np.concatenate([xy, xy + wh], -1), 0),
                               jnp.float32),
          "labels": jnp.asarray(rng.integers(0, 3, (batch_size, max_boxes)), jnp.int32),
          "box_mask": jnp.asarray(mask), "valid": jnp.ones((batch_size,), bool)}


_COMPILED = {}


def loss_and_grads(model_config, loss_config, batch, loss_state=None):
  """``(loss, metrics, new_state, grads)``; the jitted function of a config pair is reused."""
  key = (model_config.to_json(), loss_config.to_json())
  if key not in _COMPILED:
    detector = models.build_detector(model_config, loss_config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(detector, nnx.Param, ...)

    @jax.jit
    def f(params, batch, loss_state):
      def loss_fn(p):
        loss, metrics, new_state = nnx.merge(graphdef, p, rest).loss(batch, loss_state)
        return loss, (metrics, new_state)
      return jax.value_and_grad(loss_fn, has_aux=True)(params)

    _COMPILED.clear()  # keep one detector's programs alive at a time
    _COMPILED[key] = (f, params)
  f, params = _COMPILED[key]
  if loss_state is None:
    loss_state = models.init_loss_state(model_config, loss_config)
  (loss, (metrics, new_state)), grads = f(params, batch, loss_state)
  return float(loss), jax.device_get(metrics), new_state, grads
