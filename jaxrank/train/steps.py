"""The training state and the pure step functions, shared by the trainer and the search.

The detector (see :mod:`jaxrank.models.family`) is split into ``graphdef, params, rest =
nnx.split(model, nnx.Param, ...)``; the state is ``{params, rest, opt_state, loss_state}``.
Steps are pure functions of ``(state, batch)`` that use only the detector interface:
``model.loss(batch, loss_state)`` and ``model.detect(images, ...)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrank import models
from jaxrank.data import normalize_images
from jaxrank.train import sharding as shard_lib
from jaxrank.train.checkpoints import all_finite


def build_model(config, seed: int | None = None):
  """The detector of ``config.model`` trained with ``config.loss``."""
  seed = int(config.train.seed if seed is None else seed)
  return models.build_detector(config.model, config.loss, rngs=nnx.Rngs(seed))


def split_model(model) -> tuple[Any, Any, Any]:
  """``graphdef, params (nnx.Param), rest (every other variable)``."""
  return nnx.split(model, nnx.Param, ...)


def param_sharding_mode(config) -> str:
  return str(config.train.get("param_sharding", "replicated"))


def init_state(config, mesh) -> tuple[Any, dict[str, Any]]:
  """``graphdef`` and the initial ``{params, rest, loss_state}``, replicated (or split with
  ``train.param_sharding='fsdp'``, see :func:`jaxrank.train.sharding.leaf_sharding`).

  Initialised under ``jax.jit`` straight into its sharding, unless ``model.pretrained``
  names a weights file (read on the host, then placed).
  """

  def init():
    _, params, rest = split_model(build_model(config))
    return {"params": params, "rest": rest,
            "loss_state": models.init_loss_state(config.model, config.loss)}

  graphdef, _, _ = split_model(nnx.eval_shape(lambda: build_model(config)))
  shardings = shard_lib.state_shardings(jax.eval_shape(init), mesh, param_sharding_mode(config))
  if config.model.get("pretrained"):
    return graphdef, jax.device_put(shard_lib.replicate(init(), mesh), shardings)
  return graphdef, jax.jit(init, out_shardings=shardings)()


def abstract_state(config, tx, mesh) -> tuple[Any, dict[str, Any]]:
  """``graphdef`` and the abstract training state (shapes, dtypes, shardings) without
  materialising parameters (``jax.eval_shape``)."""
  graphdef, params, rest = split_model(nnx.eval_shape(lambda: build_model(config)))

  def init_rest():
    return tx.init(params), models.init_loss_state(config.model, config.loss)

  opt_state, loss_state = jax.eval_shape(init_rest)
  state = {"params": params, "rest": rest, "opt_state": opt_state, "loss_state": loss_state}
  mode = param_sharding_mode(config)
  return graphdef, jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                   sharding=shard_lib.leaf_sharding(x, mesh, mode)),
    state)


def init_opt_state(tx, params, mesh, mode: str = "replicated"):
  """``tx.init(params)`` placed like :func:`init_state`'s parameters."""
  shardings = shard_lib.state_shardings(jax.eval_shape(tx.init, params), mesh, mode)
  return jax.jit(tx.init, out_shardings=shardings)(params)


def model_batch(batch: dict[str, Any]) -> dict[str, Any]:
  """The detectors' batch from a loader batch: ``image`` normalised to float32 from its
  ``uint8`` pixels and ``image_hw`` (:func:`jaxrank.data.normalize_images`; float images
  pass unchanged)."""
  if "image_hw" not in batch:
    return batch
  out = {k: v for k, v in batch.items() if k != "image_hw"}
  out["image"] = normalize_images(batch["image"], batch["image_hw"])
  return out


def train_step_fn(graphdef, tx):
  """The pure ``step(state, batch) -> (state, metrics)`` (not jitted; see
  :func:`make_train_step`).

  ``metrics`` has ``loss``, the loss's own metrics, ``grad_norm`` and ``finite``. A step whose
  loss, gradient norm or updated state is not finite returns the input state unchanged
  (``finite`` False).
  """

  def step(state, batch):
    batch = model_batch(batch)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["rest"])
      loss, metrics, new_loss_state = model.loss(batch, state["loss_state"])
      _, _, new_rest = split_model(model)
      return loss, (metrics, new_loss_state, new_rest)

    (loss, (metrics, new_loss_state, new_rest)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
    )(state["params"])
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
      "params": optax.apply_updates(state["params"], updates),
      "rest": new_rest,
      "opt_state": new_opt_state,
      "loss_state": new_loss_state,
    }
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_state)
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    out.update(loss=jnp.asarray(loss, jnp.float32), grad_norm=grad_norm, finite=finite)
    return new_state, out

  return step


def make_train_step(graphdef, tx, mesh, *, donate: bool = True, state_shardings: Any = None):
  """Jitted :func:`train_step_fn` with the state replicated (or placed by
  ``state_shardings``, a matching tree of shardings) and donated, and the batch sharded over
  the ``'data'`` axis of ``mesh``."""
  repl = shard_lib.replicated(mesh)
  state_sh = repl if state_shardings is None else state_shardings
  return jax.jit(
    train_step_fn(graphdef, tx),
    in_shardings=(state_sh, shard_lib.data_sharded(mesh)),
    out_shardings=(state_sh, repl),
    donate_argnums=(0,) if donate else (),
  )


def eval_step_fn(graphdef, eval_config):
  """The pure ``detect(params, rest, images, image_hw=None) -> {boxes, scores, classes,
  valid}`` with the ``eval`` section's post-processing; ``uint8`` images are normalised inside
  their ``image_hw`` (see :func:`model_batch`)."""

  def detect(params, rest, images, image_hw=None):
    model = nnx.merge(graphdef, params, rest)
    if image_hw is not None:
      images = normalize_images(images, image_hw)
    det = model.detect(
      images,
      score_threshold=float(eval_config.score_threshold),
      max_detections=int(eval_config.max_detections),
      iou_threshold=float(eval_config.iou_threshold),
      pre_nms_top_k=int(eval_config.pre_nms_top_k),
    )
    return {"boxes": det.boxes, "scores": det.scores, "classes": det.classes,
            "valid": det.valid}

  return detect


def make_eval_step(graphdef, eval_config, mesh, *, param_shardings: Any = None,
                   rest_shardings: Any = None):
  """Jitted :func:`eval_step_fn` (sharded like the images; parameters replicated unless
  shardings are given)."""
  repl, data = shard_lib.replicated(mesh), shard_lib.data_sharded(mesh)
  params_sh = repl if param_shardings is None else param_shardings
  rest_sh = repl if rest_shardings is None else rest_shardings
  return jax.jit(eval_step_fn(graphdef, eval_config),
                 in_shardings=(params_sh, rest_sh, data, data), out_shardings=data)
