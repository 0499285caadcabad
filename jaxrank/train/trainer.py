"""Data-parallel training loop for the detectors and ranking-based losses.

:func:`train` runs a config (see :mod:`jaxrank.train.config`) in a work directory:

* the model is split into ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``
  and the step is a pure ``jax.jit`` function of ``(params, rest, opt_state, loss_state,
  batch)`` with the states donated, parameters replicated and the batch sharded over the
  ``'data'`` mesh axis (:mod:`jaxrank.train.sharding`);
* non-finite losses or gradients leave every state unchanged (the step is skipped and
  counted); ``train.nan_policy='stop'`` ends the run instead with
  :class:`NonFiniteLossError`, leaving the last checkpoint as it was;
* checkpoints (:mod:`jaxrank.train.checkpoints`) are saved every
  ``train.checkpoint_every`` steps, at the end and on SIGTERM, and a run in a work
  directory with checkpoints resumes from the latest readable one, at the same position
  of the data stream;
* the work directory receives ``config.json``, ``metrics.json``, TensorBoard events,
  PNG plots, the final validation detections (COCO results format) and checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrank.train import checkpoints as ckpt_lib
from jaxrank.train import config as config_lib
from jaxrank.train import evaluation
from jaxrank.train import input_pipeline
from jaxrank.train import logging as log_lib
from jaxrank.train import optim
from jaxrank.train import plots
from jaxrank.train import sharding as shard_lib

log = logging.getLogger("jaxrank.train")


class NonFiniteLossError(RuntimeError):
  """The loss or the gradients became NaN/inf and the policy says to stop."""


class TrainingInterrupted(RuntimeError):
  """SIGTERM or SIGINT received; a checkpoint was saved at ``step``."""

  def __init__(self, message: str, step: int, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.step = step
    self.signum = int(signum)


def _models():
  import jaxrank.models
  import jaxrank.models.recipes

  return jaxrank.models, jaxrank.models.recipes


# ----------------------------------------------------------------------------------------
# Model and state.


def build_model(model_config, seed: int):
  models, _ = _models()
  return models.build_detector(model_config, rngs=nnx.Rngs(int(seed)))


def split_model(model) -> tuple[Any, Any, Any]:
  """``graphdef, params (nnx.Param), rest (every other variable)``."""
  return nnx.split(model, nnx.Param, ...)


def _param_sharding(config) -> str:
  return str(config.train.get("param_sharding", "replicated"))


def init_state(config, mesh) -> tuple[Any, dict[str, Any]]:
  """``graphdef`` and the initial ``{params, rest, loss_state}``, replicated (or split with
  ``train.param_sharding='fsdp'``, see :func:`jaxrank.train.sharding.leaf_sharding`).

  Initialised under ``jax.jit`` straight into its sharding, unless ``model.pretrained``
  names a weights file (read on the host, then placed).
  """
  _, recipes = _models()

  def init():
    model = build_model(config.model, config.train.seed)
    _, params, rest = split_model(model)
    return {"params": params, "rest": rest, "loss_state": recipes.init_loss_state(config.loss)}

  graphdef, _, _ = split_model(nnx.eval_shape(lambda: build_model(config.model, config.train.seed)))
  shardings = shard_lib.state_shardings(jax.eval_shape(init), mesh, _param_sharding(config))
  if config.model.get("pretrained"):
    return graphdef, jax.device_put(shard_lib.replicate(init(), mesh), shardings)
  return graphdef, jax.jit(init, out_shardings=shardings)()


def abstract_state(config, tx, mesh) -> tuple[Any, dict[str, Any]]:
  """``graphdef`` and the abstract training state (shapes, dtypes, shardings) without
  materialising parameters (``jax.eval_shape``)."""
  _, recipes = _models()
  abs_model = nnx.eval_shape(lambda: build_model(config.model, config.train.seed))
  graphdef, params, rest = split_model(abs_model)

  def init_rest():
    return tx.init(params), recipes.init_loss_state(config.loss)

  opt_state, loss_state = jax.eval_shape(init_rest)
  state = {"params": params, "rest": rest, "opt_state": opt_state, "loss_state": loss_state}
  mode = _param_sharding(config)
  return graphdef, jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard_lib.leaf_sharding(x, mesh, mode)),
    state)


def init_opt_state(tx, params, mesh, mode: str = "replicated"):
  """``tx.init(params)`` placed like :func:`init_state`'s parameters."""
  shardings = shard_lib.state_shardings(jax.eval_shape(tx.init, params), mesh, mode)
  return jax.jit(tx.init, out_shardings=shardings)(params)


def static_info(graphdef, state):
  model = nnx.merge(graphdef, state["params"], state["rest"])
  return model.static_info()


# ----------------------------------------------------------------------------------------
# Steps.


def train_step_fn(graphdef, detector_static, loss_config, tx):
  """The pure ``step(state, batch) -> (state, metrics)`` (not jitted; see
  :func:`make_train_step`).

  ``state`` is ``{params, rest, opt_state, loss_state}``. ``metrics`` has ``loss``, the
  loss's own metrics, ``grad_norm`` and ``finite``; a non-finite loss or gradient norm
  returns the input state unchanged.
  """
  _, recipes = _models()

  def step(state, batch):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["rest"])
      outputs = model(batch["image"])
      loss, (metrics, new_loss_state) = recipes.detection_loss(
        detector_static, outputs, batch, loss_config, state["loss_state"]
      )
      _, _, new_rest = split_model(model)
      return loss, (metrics, new_loss_state, new_rest)

    (loss, (metrics, new_loss_state, new_rest)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
    )(state["params"])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    new_state = {
      "params": new_params,
      "rest": new_rest,
      "opt_state": new_opt_state,
      "loss_state": new_loss_state,
    }
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    out.update(loss=jnp.asarray(loss, jnp.float32), grad_norm=grad_norm, finite=finite)
    return new_state, out

  return step


def make_train_step(graphdef, detector_static, loss_config, tx, mesh, *, donate: bool = True,
                    state_shardings: Any = None):
  """Jitted :func:`train_step_fn` with the state replicated (or placed by
  ``state_shardings``, a matching tree of shardings) and donated, and the batch sharded over
  the ``'data'`` axis of ``mesh``."""
  repl = shard_lib.replicated(mesh)
  state_sh = repl if state_shardings is None else state_shardings
  return jax.jit(
    train_step_fn(graphdef, detector_static, loss_config, tx),
    in_shardings=(state_sh, shard_lib.data_sharded(mesh)),
    out_shardings=(state_sh, repl),
    donate_argnums=(0,) if donate else (),
  )


def eval_step_fn(graphdef, eval_config):
  """The pure ``detect(params, rest, images) -> {boxes, scores, classes, valid}`` with the
  ``eval`` section's post-processing."""

  def detect(params, rest, images):
    model = nnx.merge(graphdef, params, rest)
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
  return jax.jit(eval_step_fn(graphdef, eval_config), in_shardings=(params_sh, rest_sh, data),
                 out_shardings=data)


def run_evaluation(
  detect_fn,
  params,
  rest,
  dataset,
  config,
  mesh,
  *,
  num_plot_images: int = 0,
  desc: str = "eval",
  progress: bool = True,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], dict[str, np.ndarray] | None]:
  """Detections on every image of ``dataset`` and their COCO metrics.

  Returns ``(metrics, results, plot_batch)``: ``metrics`` from
  :func:`evaluation.evaluate_coco` (None on processes other than 0), COCO ``results``
  (all hosts' images) and the first ``num_plot_images`` images with ground truth and
  detections (process 0), or None.
  """
  global_batch = int(config.eval.batch_size)
  n_dev = mesh.devices.size
  global_batch = max(n_dev, -(-global_batch // n_dev) * n_dev)
  per_host = shard_lib.per_host_batch_size(global_batch, mesh)
  results: list[dict[str, Any]] = []
  plot_batch = None
  label_map = dataset.label_to_category_id
  it = input_pipeline.eval_batches(
    dataset, config.data, per_host_batch=per_host,
    shard_index=jax.process_index(), shard_count=jax.process_count(),
  )
  bar = _progress(total=len(it), desc=desc, enabled=progress, leave=False)
  with it:
    for batch in it:
      gb = shard_lib.global_batch(
        {k: batch[k] for k in ("image", "image_id", "scale", "valid")}, mesh
      )
      det = detect_fn(params, rest, gb["image"])
      host = shard_lib.to_host(
        {**det, "image_id": gb["image_id"], "scale": gb["scale"], "valid_image": gb["valid"]}
      )
      classes = np.where(host["valid"], host["classes"], -1)
      results.extend(
        evaluation.detections_to_coco_results(
          host["image_id"], host["boxes"], host["scores"], classes, host["valid_image"],
          host["scale"], label_map,
        )
      )
      if num_plot_images and plot_batch is None and jax.process_index() == 0:
        n = min(num_plot_images, int(np.sum(batch["valid"])))
        plot_batch = {
          "images": batch["image"][:n], "gt_boxes": batch["boxes"][:n],
          "gt_labels": batch["labels"][:n], "gt_mask": batch["box_mask"][:n],
          "det_boxes": host["boxes"][:n], "det_scores": host["scores"][:n],
          "det_classes": host["classes"][:n], "det_valid": host["valid"][:n],
        }
      bar.update(1)
  bar.close()
  if jax.process_index() != 0:
    return None, results, None
  metrics = evaluation.evaluate_coco(dataset.coco, results, class_names=dataset.class_names)
  return metrics, results, plot_batch


def scalar_eval_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
  """The scalar metrics and per-class AP of :func:`evaluation.evaluate_coco`."""
  out = {k: v for k, v in metrics.items() if isinstance(v, float)}
  for name, ap in metrics.get("per_class_AP", {}).items():
    out[f"AP/{name}"] = ap
  return out


# ----------------------------------------------------------------------------------------
# Helpers.


class _NullBar:
  def update(self, n=1):
    pass

  def set_postfix(self, *a, **k):
    pass

  def close(self):
    pass

  def write(self, s):
    print(s, file=sys.stderr)


def _progress(total: int, desc: str, enabled: bool, initial: int = 0, leave: bool = True):
  if not enabled or jax.process_index() != 0:
    return _NullBar()
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, desc=desc, unit="step" if desc == "train" else "batch",
              dynamic_ncols=True, leave=leave, mininterval=1.0, smoothing=0.1)


def default_workdir(config) -> str:
  return os.path.join("runs", f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_config(config, *, num_devices: int, steps_per_epoch: int):
  """Fields set by the trainer: ranking groups and the aLRP balance period."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if config.train.ranking == "per_device":
      if "ranking_groups" not in config.loss:
        raise config_lib.ConfigError("train.ranking='per_device' needs loss.ranking_groups")
      config.loss.ranking_groups = int(num_devices)
    if "alrp_period" in config.loss and int(config.loss.alrp_period) == 0:
      config.loss.alrp_period = int(steps_per_epoch)
  return config


def _check_datasets(train_ds, val_ds, config) -> None:
  for name, ds in (("training", train_ds), ("validation", val_ds)):
    if ds.num_classes != config.model.num_classes:
      raise config_lib.ConfigError(
        f"the {name} set has {ds.num_classes} classes but data.num_classes / "
        f"model.num_classes is {config.model.num_classes}; set data.num_classes="
        f"{ds.num_classes}"
      )


@dataclasses.dataclass
class TrainResult:
  workdir: str
  step: int
  metrics: dict[str, Any]


# ----------------------------------------------------------------------------------------
# The loop.


def train(config, workdir: str | None = None) -> TrainResult:
  """Trains ``config`` in ``workdir`` (resuming from its checkpoints) and evaluates.

  Raises:
    config.ConfigError: an invalid config.
    FileNotFoundError, ValueError, jaxrank.data.CorruptImageError: bad data.
    NonFiniteLossError: non-finite loss with ``train.nan_policy='stop'``, or more than
      ``train.max_consecutive_nan_skips`` consecutive skipped steps.
    TrainingInterrupted: SIGTERM; a checkpoint was saved.
  """
  t_start = time.time()
  config_lib.validate(config)
  workdir = os.path.abspath(workdir or default_workdir(config))
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  mesh = shard_lib.make_mesh()
  n_proc, proc = jax.process_count(), jax.process_index()
  per_host = shard_lib.per_host_batch_size(int(config.train.batch_size), mesh)

  train_ds, val_ds = input_pipeline.build_datasets(config.data)
  _check_datasets(train_ds, val_ds, config)
  spe = input_pipeline.steps_per_epoch(train_ds, per_host, n_proc)
  if spe == 0:
    raise config_lib.ConfigError(
      f"the training set has {len(train_ds)} images, fewer than train.batch_size="
      f"{config.train.batch_size}"
    )
  total_steps = int(config.train.num_steps) or int(config.train.num_epochs) * spe
  config = resolve_config(config, num_devices=mesh.devices.size, steps_per_epoch=spe)
  if is_main:
    log_lib.write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))
  log.info(
    "%s: %d train / %d val images, %d classes; %d devices on %d processes; global batch %d "
    "(%d per host); %d steps (%d per epoch); workdir %s",
    config.name, len(train_ds), len(val_ds), train_ds.num_classes, mesh.devices.size, n_proc,
    config.train.batch_size, per_host, total_steps, spe, workdir,
  )

  tx, schedule = optim.build_optimizer(
    config.optimizer, global_batch_size=int(config.train.batch_size),
    total_steps=total_steps, steps_per_epoch=spe,
  )
  log.info("peak learning rate %.6g",
           optim.peak_learning_rate(config.optimizer, int(config.train.batch_size)))

  # State: restore the latest checkpoint or initialise.
  graphdef, abstract = abstract_state(config, tx, mesh)
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    save_every=int(config.train.checkpoint_every),
    keep=int(config.train.keep_checkpoints),
  )
  restored = checkpointer.restore_latest(abstract)
  skipped_total = 0
  if restored is not None:
    start_step, state, meta = restored
    skipped_total = int(meta.get("skipped_steps", 0))
    if int(meta.get("steps_per_epoch", spe)) != spe:
      log.warning("steps per epoch changed from %s to %d since the checkpoint; the data "
                  "order differs from the interrupted run", meta.get("steps_per_epoch"), spe)
    log.info("resumed from checkpoint step %d", start_step)
  else:
    start_step = 0
    graphdef, init = init_state(config, mesh)
    opt_state = init_opt_state(tx, init["params"], mesh, _param_sharding(config))
    state = {**init, "opt_state": opt_state}

  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  if _param_sharding(config) == "fsdp":
    split = [x for x in jax.tree.leaves(abstract["params"]) if not x.sharding.is_fully_replicated]
    log.info("fsdp: %d of %d parameter arrays (%.1f%% of the parameters) split over %d devices",
             len(split), len(jax.tree.leaves(abstract["params"])),
             100.0 * sum(x.size for x in split)
             / max(1, sum(x.size for x in jax.tree.leaves(abstract["params"]))), mesh.devices.size)
  detector_static = static_info(graphdef, state)
  train_step = make_train_step(graphdef, detector_static, config.loss, tx, mesh,
                               state_shardings=shardings)
  detect_fn = make_eval_step(graphdef, config.eval, mesh, param_shardings=shardings["params"],
                             rest_shardings=shardings["rest"])
  writer = log_lib.MetricWriter(workdir, start_step=start_step, enabled=is_main)
  plot_dir = os.path.join(workdir, "plots")

  def meta_at(step: int) -> dict[str, Any]:
    epoch, batch_in_epoch = divmod(step, spe)
    return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "steps_per_epoch": spe,
            "skipped_steps": skipped_total, "config_name": config.name,
            "global_batch_size": int(config.train.batch_size)}

  def evaluate(step: int, final: bool) -> dict[str, Any] | None:
    t0 = time.time()
    n_plot = int(config.eval.num_plot_images) if (config.train.plots and final) else 0
    metrics, results, plot_batch = run_evaluation(
      detect_fn, state["params"], state["rest"], val_ds, config, mesh,
      num_plot_images=n_plot, progress=bool(config.train.progress_bar),
    )
    if not is_main:
      return None
    scalars = scalar_eval_metrics(metrics)
    scalars["eval_time_s"] = time.time() - t0
    writer.scalars(step, scalars, kind="eval")
    writer.text("eval/summary", metrics["summary"], step)
    log.info("step %d: AP %.4f AP50 %.4f AP75 %.4f (%d detections, %.1fs)", step,
             metrics["AP"], metrics["AP50"], metrics["AP75"], len(results), time.time() - t0)
    if config.train.plots:
      plots.plot_pr_curve(metrics["pr_curve"], os.path.join(plot_dir, "pr_curve.png"),
                          class_names=val_ds.class_names, title=f"PR at IoU 0.5, step {step}")
      plots.plot_loss_curves(writer.history["train"], os.path.join(plot_dir, "loss_curves.png"),
                             writer.history["eval"])
      if plot_batch is not None and len(plot_batch["images"]):
        plots.plot_detections_grid(
          **plot_batch, path=os.path.join(plot_dir, "val_detections.png"),
          class_names=val_ds.class_names,
          title=f"step {step}",
        )
    if final:
      evaluation.write_coco_results(os.path.join(workdir, "detections_val.json"), results)
      with open(os.path.join(workdir, "eval_summary.txt"), "w", encoding="utf-8") as f:
        f.write(metrics["summary"] + "\n")
    return metrics

  # Training.
  step = start_step
  nan_policy = config.train.nan_policy
  max_skips = int(config.train.max_consecutive_nan_skips)
  consecutive_skips = 0
  log_every = int(config.train.log_every)
  pending: list[dict[str, Any]] = []
  window_start, window_images = time.time(), 0
  train_time = 0.0
  bar = _progress(total=total_steps, desc="train", enabled=bool(config.train.progress_bar),
                  initial=start_step)
  stop_error: Exception | None = None

  def flush_metrics() -> None:
    nonlocal pending, window_start, window_images, skipped_total, consecutive_skips
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    finite = np.array([bool(m["finite"]) for m in fetched])
    for s, f, m in zip(steps, finite, fetched):
      if not f:
        skipped_total += 1
        consecutive_skips += 1
        log.warning("step %d: non-finite loss (%s) or gradient norm (%s); step skipped "
                    "(%d skipped so far)", s, m["loss"], m["grad_norm"], skipped_total)
        writer.event("nan_events", {"step": s, "loss": str(m["loss"]),
                                    "grad_norm": str(m["grad_norm"]), "action": nan_policy})
      else:
        consecutive_skips = 0
    good = [m for m, f in zip(fetched, finite) if f]
    elapsed = max(time.time() - window_start, 1e-9)
    row: dict[str, Any] = {}
    if good:
      for k in good[0]:
        if k != "finite":
          row[k] = float(np.mean([float(m[k]) for m in good]))
    row["lr"] = float(schedule(steps[-1] - 1))
    row["img_per_s"] = window_images / elapsed
    row["steps_per_s"] = len(steps) / elapsed
    row["skipped_steps"] = skipped_total
    row["epoch"] = (steps[-1]) / spe
    writer.scalars(steps[-1], row)
    postfix = {"loss": f"{row.get('loss', float('nan')):.4f}", "img/s": f"{row['img_per_s']:.1f}"}
    if skipped_total:
      postfix["skipped"] = skipped_total
    bar.set_postfix(postfix, refresh=False)
    pending = []
    window_start, window_images = time.time(), 0

  try:
    with ckpt_lib.TerminationRequest((signal.SIGTERM, signal.SIGINT)) as term:
      epoch, batch_in_epoch = divmod(step, spe)
      t_loop = time.time()
      while step < total_steps:
        it = input_pipeline.train_batches(
          train_ds, config.data, per_host_batch=per_host, epoch=epoch,
          start_batch=batch_in_epoch, shard_index=proc, shard_count=n_proc,
        )
        with it:
          for batch in it:
            gb = shard_lib.global_batch(batch, mesh)
            state, metrics = train_step(state, gb)
            step += 1
            window_images += int(config.train.batch_size)
            pending.append((step, metrics))
            bar.update(1)
            must_check = nan_policy == "stop" or (max_skips > 0 and consecutive_skips > 0)
            if must_check or step % log_every == 0 or step == total_steps:
              if nan_policy == "stop" and not bool(jax.device_get(metrics["finite"])):
                flush_metrics()
                raise NonFiniteLossError(
                  f"non-finite loss ({float(metrics['loss'])}) or gradient norm at step {step}; "
                  f"stopping (train.nan_policy='stop'). Parameters were not updated; the last "
                  f"checkpoint (step {checkpointer.latest_step()}) is intact. Try a lower "
                  "optimizer.lr, optimizer.grad_clip_norm > 0, or check the data."
                )
              flush_metrics()
              if max_skips > 0 and consecutive_skips >= max_skips:
                raise NonFiniteLossError(
                  f"{consecutive_skips} consecutive steps up to step {step} had a non-finite "
                  f"loss or gradient and were skipped (train.max_consecutive_nan_skips="
                  f"{max_skips}); stopping. The last checkpoint (step "
                  f"{checkpointer.latest_step()}) is intact. Try a lower optimizer.lr or "
                  "optimizer.grad_clip_norm > 0."
                )
            if checkpointer.maybe_save(step, state, meta_at(step)):
              pass
            if ckpt_lib.any_process(term.requested):
              flush_metrics()
              checkpointer.save(step, state, meta_at(step))
              checkpointer.wait()
              signum = term.signum or signal.SIGTERM
              raise TrainingInterrupted(
                f"terminated by signal {signal.Signals(signum).name} at step {step}; "
                f"checkpoint saved in {checkpointer.directory}. Run again with --workdir "
                f"{workdir} to resume.",
                step, signum,
              )
            eval_every = int(config.train.eval_every)
            if eval_every and step % eval_every == 0 and step < total_steps:
              flush_metrics()
              t_eval = time.time()
              evaluate(step, final=False)
              window_start += time.time() - t_eval
            if step >= total_steps:
              break
        epoch, batch_in_epoch = epoch + 1, 0
      flush_metrics()
      jax.block_until_ready(state)
      train_time = time.time() - t_loop
      bar.close()
      checkpointer.save(step, state, meta_at(step))
  except BaseException as e:
    stop_error = e
    raise
  finally:
    bar.close()
    try:
      checkpointer.close()
    finally:
      if stop_error is not None:
        writer.close()

  final = evaluate(step, final=True) or {}
  summary: dict[str, Any] = {}
  if is_main:
    summary = scalar_eval_metrics(final)
    summary.update(
      step=step,
      per_class_AP=final.get("per_class_AP", {}),
      train_time_s=train_time,
      total_time_s=time.time() - t_start,
      steps_this_run=step - start_step,
      skipped_steps=skipped_total,
      resumed_from=start_step,
      train_images_per_s=(step - start_step) * int(config.train.batch_size) / max(train_time, 1e-9)
      if step > start_step else None,
      num_devices=mesh.devices.size,
      num_processes=n_proc,
    )
    writer.final(summary)
    log.info("done: step %d, AP %.4f, training %.1fs, total %.1fs; results in %s",
             step, final.get("AP", float("nan")), train_time, time.time() - t_start, workdir)
  writer.close()
  return TrainResult(workdir=workdir, step=step, metrics=summary)


# ----------------------------------------------------------------------------------------
# Evaluating a checkpoint.


def evaluate_checkpoint(
  config,
  checkpoint_dir: str,
  *,
  step: int | None = None,
  output_dir: str | None = None,
  plots_enabled: bool = True,
  progress: bool = True,
) -> dict[str, Any]:
  """COCO metrics of a checkpoint on ``config``'s validation set.

  Writes ``detections.json`` (COCO results format), ``metrics.json``, ``summary.txt`` and,
  with ``plots_enabled``, ``pr_curve.png`` and ``val_detections.png`` into ``output_dir``
  (default ``<checkpoint_dir>/../eval/step_<step>``) on process 0. ``step`` None: the
  latest readable checkpoint.
  """
  config_lib.validate(config)
  mesh = shard_lib.make_mesh()
  _, val_ds = input_pipeline.build_datasets(config.data, with_train=False)
  _check_datasets(val_ds, val_ds, config)
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, save_every=0, keep=10**6)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {checkpoint_dir}")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir} (have {steps})")
    meta = checkpointer.restore_meta(step if step is not None else steps[-1])
    spe = int(meta.get("steps_per_epoch", 1)) or 1
    config = resolve_config(config, num_devices=mesh.devices.size, steps_per_epoch=spe)
    tx, _ = optim.build_optimizer(
      config.optimizer, global_batch_size=int(config.train.batch_size), total_steps=max(1, spe),
      steps_per_epoch=spe,
    )
    graphdef, abstract = abstract_state(config, tx, mesh)
    if step is None:
      step, state, meta = checkpointer.restore_latest(abstract)
    else:
      state, meta = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  detect_fn = make_eval_step(graphdef, config.eval, mesh,
                             param_shardings=jax.tree.map(lambda x: x.sharding, abstract["params"]),
                             rest_shardings=jax.tree.map(lambda x: x.sharding, abstract["rest"]))
  n_plot = int(config.eval.num_plot_images) if plots_enabled else 0
  metrics, results, plot_batch = run_evaluation(
    detect_fn, state["params"], state["rest"], val_ds, config, mesh,
    num_plot_images=n_plot, progress=progress,
  )
  if jax.process_index() != 0:
    return {}
  out = output_dir or os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), "eval",
                                   f"step_{step}")
  os.makedirs(out, exist_ok=True)
  evaluation.write_coco_results(os.path.join(out, "detections.json"), results)
  summary = scalar_eval_metrics(metrics)
  summary.update(step=step, per_class_AP=metrics["per_class_AP"], num_detections=len(results),
                 num_images=len(val_ds), checkpoint_dir=os.path.abspath(checkpoint_dir))
  log_lib.write_json(os.path.join(out, "metrics.json"), summary)
  with open(os.path.join(out, "summary.txt"), "w", encoding="utf-8") as f:
    f.write(metrics["summary"] + "\n")
  if plots_enabled:
    plots.plot_pr_curve(metrics["pr_curve"], os.path.join(out, "pr_curve.png"),
                        class_names=val_ds.class_names, title=f"PR at IoU 0.5, step {step}")
    if plot_batch is not None and len(plot_batch["images"]):
      plots.plot_detections_grid(**plot_batch, path=os.path.join(out, "val_detections.png"),
                                 class_names=val_ds.class_names,
                                 title=f"step {step}")
  summary["summary"] = metrics["summary"]
  summary["output_dir"] = out
  return summary

