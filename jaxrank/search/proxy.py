"""Proxy trainings of the Parameterized AP Loss search, all sampled losses of a round at once.

The published search trains one detector per sampled loss, one after another. Here the
``K`` detectors of a round are one computation: the training step of
:func:`jaxrank.train.steps.train_step_fn` is ``jax.vmap``-ed over the training state
(parameters, optimiser state and the loss state, which holds the PAP functions), with the
batch shared, and the ``K`` axis is sharded over the devices (``Mesh`` axis ``'proxies'``).
Every proxy starts from the same initial weights and sees the same batches, so the rewards
differ only through the loss.

Reward of a proxy: COCO AP@[.5:.95] on the held-out split (``data`` validation split), or 0
if it failed: more than ``abort_after`` steps whose loss was non-finite or within 1e-6 of
1.0 (the published rule), or non-finite final parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrank.train import config as config_lib
from jaxrank.train import evaluation, input_pipeline, optim, trainer
from jaxrank.train import logging as log_lib
from jaxrank.train import steps as steps_lib

log = logging.getLogger("jaxrank.search")

PROXY_AXIS = "proxies"
#: A step whose loss is within this of 1.0 counts as stuck (published ``abs(loss - 1) < 1e-6``).
STUCK_TOLERANCE = 1e-6


def _as_state_dtype(x):
  """Floating leaves as float32 (the PAP functions), integer ones (counters) kept."""
  x = jnp.asarray(x)
  return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.inexact) else x


class Interrupted(RuntimeError):
  """``should_stop()`` returned True during a proxy training."""


@dataclasses.dataclass
class ProxyResult:
  """Outcome of ``K`` proxy trainings (arrays of length ``K``)."""
  rewards: np.ndarray        # AP, 0 where failed
  ap: np.ndarray             # COCO AP (NaN where failed)
  ap50: np.ndarray
  failed: np.ndarray         # bool
  bad_steps: np.ndarray      # non-finite or stuck steps
  final_loss: np.ndarray     # mean loss over the last 10% of steps
  train_time_s: float
  eval_time_s: float


def proxy_mesh(num_proxies: int, devices=None) -> Mesh:
  """1-D mesh ``('proxies',)`` over the largest number of local devices dividing
  ``num_proxies``."""
  devices = list(jax.local_devices() if devices is None else devices)
  n = math.gcd(int(num_proxies), len(devices))
  return Mesh(np.asarray(devices[:n]), (PROXY_AXIS,))


class ProxyTrainer:
  """Trains and scores detectors for a batch of PAP parameters.

  Args:
    config: a trainer config (see :mod:`jaxrank.train.config`) with ``loss.name = 'pap'``:
      its model, data (training split = search-train, validation split = search-val),
      optimiser, ``train.num_steps`` / ``num_epochs``, ``train.batch_size``, ``train.seed``
      and ``eval`` sections define the proxy.
    abort_after: a proxy with more bad steps than this scores 0 (published: 50).
    devices: devices to shard the proxies over (default: all local devices).
  """

  def __init__(self, config, *, abort_after: int = 50, devices=None):
    config_lib.validate(config)
    if config.loss.name != "pap":
      raise config_lib.ConfigError("the search proxy needs loss.name='pap', "
                                   f"got {config.loss.name!r}")
    self.abort_after = int(abort_after)
    self._devices = devices
    self.train_ds, self.val_ds = input_pipeline.build_datasets(config.data)
    batch = int(config.train.batch_size)
    spe = input_pipeline.steps_per_epoch(self.train_ds, batch, 1)
    if spe == 0:
      raise config_lib.ConfigError(
        f"the search-train split has {len(self.train_ds)} images, fewer than "
        f"train.batch_size={batch}")
    self.steps_per_epoch = spe
    self.num_steps = int(config.train.num_steps) or int(config.train.num_epochs) * spe
    self.config = trainer.resolve_config(config, num_devices=1, steps_per_epoch=spe)
    self.tx, _ = optim.build_optimizer(self.config.optimizer, global_batch_size=batch,
                                       total_steps=self.num_steps, steps_per_epoch=spe)
    single = Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
    self.graphdef, init = steps_lib.init_state(self.config, single)
    self._init_params, self._init_rest = init["params"], init["rest"]
    self._step = steps_lib.train_step_fn(self.graphdef, self.tx)
    self._detect = steps_lib.eval_step_fn(self.graphdef, self.config.eval)
    self._compiled: dict[int, tuple[Callable, Callable, Callable, Mesh]] = {}

  # -- compiled functions per number of proxies ----------------------------------------

  def _functions(self, k: int):
    if k in self._compiled:
      return self._compiled[k]
    mesh = proxy_mesh(k, self._devices)
    split, repl = NamedSharding(mesh, P(PROXY_AXIS)), NamedSharding(mesh, P())
    tx = self.tx

    def init(params, rest, loss_params):
      tile = lambda x: jnp.broadcast_to(x, (k,) + jnp.shape(x))
      params, rest = jax.tree.map(tile, params), jax.tree.map(tile, rest)
      return {"params": params, "rest": rest, "opt_state": jax.vmap(tx.init)(params),
              "loss_state": loss_params}

    def train_step(state, counters, batch):
      state, metrics = jax.vmap(self._step, in_axes=(0, None))(state, batch)
      loss = metrics["loss"]
      bad = ~metrics["finite"] | (jnp.abs(loss - 1.0) < STUCK_TOLERANCE)
      counters = {"bad_steps": counters["bad_steps"] + bad.astype(jnp.int32),
                  "loss_sum": counters["loss_sum"] + jnp.where(metrics["finite"], loss, 0.0),
                  "loss_count": counters["loss_count"] + metrics["finite"].astype(jnp.int32),
                  "last_loss": loss}
      return state, counters

    def detect(params, rest, images, image_hw):
      return jax.vmap(self._detect, in_axes=(0, 0, None, None))(params, rest, images, image_hw)

    fns = (
        jax.jit(init, in_shardings=(repl, repl, split), out_shardings=split),
        jax.jit(train_step, in_shardings=(split, split, repl), out_shardings=(split, split),
                donate_argnums=(0, 1)),
        jax.jit(detect, in_shardings=(split, split, repl, repl), out_shardings=split),
        mesh,
    )
    self._compiled[k] = fns
    return fns

  # -- running -----------------------------------------------------------------------------

  def run(self, loss_params, *, sequential: bool = False, progress: bool = True,
          should_stop: Callable[[], bool] | None = None, desc: str = "proxies") -> ProxyResult:
    """Trains one proxy per entry of ``loss_params``, the detector's loss state with a
    leading ``K`` axis (:meth:`jaxrank.search.space.SearchSpace.loss_state`: a
    :class:`PAPParams` for RetinaNet, a ``two_stage.PAPState`` for Faster R-CNN), and scores
    it on the held-out split.

    ``sequential=True`` trains them one after another with the same code (the published
    way; for comparisons). Raises :class:`Interrupted` when ``should_stop()`` becomes true.
    """
    loss_params = jax.tree.map(_as_state_dtype, loss_params)
    sizes = {int(jnp.shape(x)[0]) if jnp.ndim(x) else -1 for x in jax.tree.leaves(loss_params)}
    if len(sizes) != 1 or -1 in sizes:
      raise ValueError("loss_params must be a loss state whose every leaf has the leading "
                       "proxy axis K")
    k = sizes.pop()
    if sequential and k > 1:
      parts = [self.run(jax.tree.map(lambda x, i=i: x[i:i + 1], loss_params), progress=progress,
                        should_stop=should_stop, desc=f"{desc} {i + 1}/{k}") for i in range(k)]
      return ProxyResult(
          **{f.name: np.concatenate([getattr(p, f.name) for p in parts])
             for f in dataclasses.fields(ProxyResult) if not f.name.endswith("_s")},
          train_time_s=sum(p.train_time_s for p in parts),
          eval_time_s=sum(p.eval_time_s for p in parts))

    init, train_step, detect, mesh = self._functions(k)
    t0 = time.time()
    state = init(self._init_params, self._init_rest, loss_params)
    split = NamedSharding(mesh, P(PROXY_AXIS))
    counters = jax.device_put({"bad_steps": np.zeros(k, np.int32),
                               "loss_sum": np.zeros(k, np.float32),
                               "loss_count": np.zeros(k, np.int32),
                               "last_loss": np.zeros(k, np.float32)}, split)
    tail_start = self.num_steps - max(1, self.num_steps // 10)
    tail = None
    bar = log_lib.progress_bar(total=self.num_steps, desc=desc, enabled=progress, leave=False)
    step = 0
    try:
      with input_pipeline.train_batches(self.train_ds, self.config.data,
                                        per_host_batch=int(self.config.train.batch_size),
                                        start_step=0, num_steps=self.num_steps) as batches:
        for batch in batches:
          if should_stop is not None and should_stop():
            raise Interrupted(f"stopped at proxy step {step}")
          if step == tail_start:
            tail = jax.tree.map(jnp.copy, counters)
          state, counters = train_step(state, counters, batch)
          step += 1
          bar.update(1)
          if step % 50 == 0 or step == self.num_steps:
            bar.set_postfix(loss=f"{float(jnp.mean(counters['last_loss'])):.4f}")
    finally:
      bar.close()
    counters = jax.device_get(counters)
    tail = jax.device_get(tail)
    finite_params = np.asarray(jax.device_get(jax.vmap(
        lambda p: jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))(
        state["params"])))
    train_time = time.time() - t0

    t1 = time.time()
    ap, ap50 = self.evaluate(detect, state["params"], state["rest"], k)
    n_tail = np.maximum(counters["loss_count"] - tail["loss_count"], 1)
    failed = (counters["bad_steps"] > self.abort_after) | ~finite_params
    return ProxyResult(
        rewards=np.where(failed, 0.0, np.nan_to_num(ap, nan=0.0)).astype(np.float32),
        ap=np.where(failed, np.nan, ap), ap50=np.where(failed, np.nan, ap50), failed=failed,
        bad_steps=counters["bad_steps"],
        final_loss=(counters["loss_sum"] - tail["loss_sum"]) / n_tail,
        train_time_s=train_time, eval_time_s=time.time() - t1)

  def evaluate(self, detect, params, rest, k: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO AP and AP50 of each of the ``k`` detectors on the held-out split."""
    results: list[list[dict[str, Any]]] = [[] for _ in range(k)]
    label_map = self.val_ds.label_to_category_id
    with input_pipeline.eval_batches(self.val_ds, self.config.data,
                                     per_host_batch=int(self.config.eval.batch_size)) as batches:
      for batch in batches:
        det = jax.device_get(detect(params, rest, batch["image"], batch["image_hw"]))
        for i in range(k):
          classes = np.where(det["valid"][i], det["classes"][i], -1)
          results[i].extend(evaluation.detections_to_coco_results(
              batch["image_id"], det["boxes"][i], det["scores"][i], classes, batch["valid"],
              batch["scale"], label_map))
    ap, ap50 = np.full(k, np.nan), np.full(k, np.nan)
    for i in range(k):
      metrics = evaluation.evaluate_coco(self.val_ds.coco, results[i],
                                         class_names=self.val_ds.class_names)
      ap[i], ap50[i] = metrics["AP"], metrics["AP50"]
    return ap, ap50
