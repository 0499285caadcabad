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
import time
from typing import Any

import jax
import numpy as np

from jaxrank import models
from jaxrank.train import checkpoints as ckpt_lib
from jaxrank.train import config as config_lib
from jaxrank.train import evaluation, input_pipeline, optim, plots
from jaxrank.train import logging as log_lib
from jaxrank.train import sharding as shard_lib
from jaxrank.train import steps as steps_lib

log = logging.getLogger("jaxrank.train")


class NonFiniteLossError(RuntimeError):
  """The loss or the gradients became NaN/inf and the policy says to stop."""


class TrainingInterrupted(RuntimeError):
  """SIGTERM or SIGINT received; a checkpoint was saved at ``step``."""

  def __init__(self, message: str, step: int, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.step = step
    self.signum = int(signum)


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
  bar = log_lib.progress_bar(total=len(it), desc=desc, enabled=progress, leave=False)
  with it:
    for batch in it:
      gb = shard_lib.global_batch(
        {k: batch[k] for k in ("image", "image_hw", "image_id", "scale", "valid")}, mesh
      )
      det = detect_fn(params, rest, gb["image"], gb["image_hw"])
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


def default_workdir(config) -> str:
  return os.path.join("runs", f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _saved_data_position(meta: dict[str, Any], step: int, layout: dict[str, int]) -> int:
  """The training stream position a checkpoint's data-iterator state continues from (its
  step for checkpoints written before the state was saved), with a warning when the batches
  at that position are no longer the interrupted run's."""
  saved = meta.get("data") or {"next_batch": step, "steps_per_epoch": meta.get("steps_per_epoch")}
  changed = [f"{key} {saved[key]} -> {value}" for key, value in layout.items()
             if saved.get(key) is not None and int(saved[key]) != value]
  if changed:
    log.warning("the data layout changed since the checkpoint (%s); the batches from here on "
                "differ from the interrupted run's", ", ".join(changed))
  return int(saved["next_batch"])


def resolve_config(config, *, num_devices: int, steps_per_epoch: int):
  """The config with the loss fields the detector family fixes for a run (e.g. one ranking
  group per device with ``train.ranking='per_device'``)."""
  config = config.copy_and_resolve_references()
  setup = models.TrainingSetup(num_devices=int(num_devices),
                               steps_per_epoch=int(steps_per_epoch),
                               per_device_ranking=config.train.ranking == "per_device")
  loss = models.prepare_loss_config(config.model, config.loss, setup)
  with config.unlocked():
    config.loss = loss
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


class MetricWindow:
  """The step metrics since the last log line; fetched from the devices together.

  Counts skipped (non-finite) steps and writes one row per flush: TensorBoard and
  ``metrics.json`` through ``writer``, a text line to the log (``train.log``; stderr too
  when no progress bar is shown) and the progress bar's postfix.
  """

  def __init__(self, *, writer, schedule, steps_per_epoch: int, total_steps: int,
               batch_size: int, nan_policy: str, skipped_total: int = 0, bar=None,
               text_to_stderr: bool = True):
    self.writer, self.schedule, self.bar = writer, schedule, bar
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    self.batch_size, self.nan_policy = batch_size, nan_policy
    self.skipped_total, self.consecutive_skips = skipped_total, 0
    self.text_to_stderr = text_to_stderr
    self.pending: list[tuple[int, dict[str, Any]]] = []
    self.start = time.time()

  def add(self, step: int, metrics: dict[str, Any]) -> None:
    self.pending.append((step, metrics))

  def pause(self, seconds: float) -> None:
    """Leaves ``seconds`` (e.g. an evaluation) out of the throughput."""
    self.start += seconds

  def flush(self) -> None:
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    good = []
    for s, m in zip(steps, fetched):
      if bool(m["finite"]):
        self.consecutive_skips = 0
        good.append(m)
        continue
      self.skipped_total += 1
      self.consecutive_skips += 1
      log.warning("step %d: non-finite loss (%s), gradient norm (%s) or updated state; step "
                  "skipped (%d skipped so far)", s, m["loss"], m["grad_norm"],
                  self.skipped_total)
      self.writer.event("nan_events", {"step": s, "loss": str(m["loss"]),
                                       "grad_norm": str(m["grad_norm"]),
                                       "action": self.nan_policy})
    elapsed = max(time.time() - self.start, 1e-9)
    row: dict[str, Any] = {}
    if good:
      for k in good[0]:
        if k != "finite":
          row[k] = float(np.mean([float(m[k]) for m in good]))
    last = steps[-1]
    row["lr"] = float(self.schedule(last - 1))
    row["img_per_s"] = len(steps) * self.batch_size / elapsed
    row["steps_per_s"] = len(steps) / elapsed
    row["skipped_steps"] = self.skipped_total
    row["epoch"] = last / self.steps_per_epoch
    self.writer.scalars(last, row)
    eta = (self.total_steps - last) / max(row["steps_per_s"], 1e-9)
    parts = " ".join(f"{k} {row[k]:.4f}" for k in row
                     if k not in ("lr", "img_per_s", "steps_per_s", "skipped_steps", "epoch",
                                  "grad_norm"))
    log.info("step %d/%d: %s grad_norm %.3g lr %.3g %.1f img/s ETA %s%s", last,
             self.total_steps, parts or "no finite step", row.get("grad_norm", float("nan")),
             row["lr"], row["img_per_s"], _duration(eta),
             f" ({self.skipped_total} skipped)" if self.skipped_total else "",
             extra={"file_only": not self.text_to_stderr})
    if self.bar is not None:
      postfix = {"loss": f"{row.get('loss', float('nan')):.4f}",
                 "img/s": f"{row['img_per_s']:.1f}"}
      if self.skipped_total:
        postfix["skipped"] = self.skipped_total
      self.bar.set_postfix(postfix, refresh=False)
    self.pending = []
    self.start = time.time()


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _save_checkpoint(checkpointer, step: int, state, meta: dict[str, Any]) -> None:
  """Saves ``state`` unless a value in it is not finite (then stops: a NaN state is never
  written over good checkpoints)."""
  if not bool(jax.device_get(jax.jit(ckpt_lib.all_finite)(state))):
    raise NonFiniteLossError(
      f"the training state at step {step} holds NaN or inf values; not saving it. The last "
      f"checkpoint (step {checkpointer.latest_step()}) is intact.")
  checkpointer.save(step, state, meta)


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
  """``'key: old -> new'`` for every field that differs between two config dicts."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out.extend(_config_changes(a, b, f"{prefix}{key}."))
    elif a != b:
      out.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return out


def _restore_or_stop(checkpointer, abstract, config, workdir: str):
  """The latest readable checkpoint, or None. A checkpoint the config cannot hold (other
  shapes or structure) stops the run with :class:`config.ConfigError` naming the changed
  fields; nothing is touched."""
  saved_path = os.path.join(workdir, "config.json")
  saved = log_lib.read_json(saved_path) if os.path.exists(saved_path) else None
  changes = _config_changes(saved, config_lib.to_dict(config)) if saved is not None else []
  try:
    return checkpointer.restore_latest(abstract), saved, changes
  except ckpt_lib.IncompatibleCheckpointError as e:
    named = "; ".join(changes) if changes else "no config field differs from config.json"
    raise config_lib.ConfigError(
      f"{e}. Config changes since the run was saved: {named}. Nothing was changed in "
      f"{workdir}; undo these changes or use another --workdir.") from None


def train(config, workdir: str | None = None) -> TrainResult:
  """Trains ``config`` in ``workdir`` (resuming from its checkpoints) and evaluates.

  Raises:
    config.ConfigError: an invalid config, or one the run's checkpoints cannot hold.
    FileNotFoundError, ValueError, jaxrank.data.CorruptImageError: bad data.
    PermissionError: the checkpoint folder cannot be written.
    NonFiniteLossError: non-finite loss with ``train.nan_policy='stop'``, more than
      ``train.max_consecutive_nan_skips`` consecutive skipped steps, or a non-finite state.
    TrainingInterrupted: SIGTERM; a checkpoint was saved.
  """
  t_start = time.time()
  config_lib.validate(config)
  workdir = os.path.abspath(workdir or default_workdir(config))
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  mesh = shard_lib.make_mesh()
  n_proc, proc = jax.process_count(), jax.process_index()
  batch_size = int(config.train.batch_size)
  per_host = shard_lib.per_host_batch_size(batch_size, mesh)

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
  log.info(
    "%s: %d train / %d val images, %d classes; %d devices on %d processes; global batch %d "
    "(%d per host); %d steps (%d per epoch); workdir %s",
    config.name, len(train_ds), len(val_ds), train_ds.num_classes, mesh.devices.size, n_proc,
    batch_size, per_host, total_steps, spe, workdir,
  )

  tx, schedule = optim.build_optimizer(
    config.optimizer, global_batch_size=batch_size, total_steps=total_steps,
    steps_per_epoch=spe,
  )
  log.info("peak learning rate %.6g", optim.peak_learning_rate(config.optimizer, batch_size))

  # State: restore the latest checkpoint or initialise.
  graphdef, abstract = steps_lib.abstract_state(config, tx, mesh)
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    save_every=int(config.train.checkpoint_every),
    keep=int(config.train.keep_checkpoints),
  )
  try:
    restored, saved_config, changes = _restore_or_stop(checkpointer, abstract, config, workdir)
  except BaseException:
    checkpointer.close()
    raise
  skipped_total = 0
  data_layout = {"steps_per_epoch": spe, "per_host_batch": per_host, "shard_count": n_proc,
                 "seed": int(config.data.seed)}
  if restored is not None:
    start_step, state, meta = restored
    skipped_total = int(meta.get("skipped_steps", 0))
    data_position = _saved_data_position(meta, start_step, data_layout)
    log.info("resumed from checkpoint step %d", start_step)
  else:
    start_step = data_position = 0
    graphdef, init = steps_lib.init_state(config, mesh)
    opt_state = steps_lib.init_opt_state(tx, init["params"], mesh,
                                         steps_lib.param_sharding_mode(config))
    state = {**init, "opt_state": opt_state}
  if is_main:
    if changes:
      for change in changes:
        log.warning("config changed since the run was saved: %s", change)
      kept = os.path.join(workdir, f"config.step_{start_step}.json")
      log_lib.write_json(kept, saved_config)
      log.warning("the previous config.json is kept as %s", kept)
    log_lib.write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))
    log_lib.write_json(os.path.join(workdir, "class_names.json"), list(val_ds.class_names))

  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  if steps_lib.param_sharding_mode(config) == "fsdp":
    leaves = jax.tree.leaves(abstract["params"])
    split = [x for x in leaves if not x.sharding.is_fully_replicated]
    log.info("fsdp: %d of %d parameter arrays (%.1f%% of the parameters) split over %d devices",
             len(split), len(leaves),
             100.0 * sum(x.size for x in split) / max(1, sum(x.size for x in leaves)),
             mesh.devices.size)
  train_step = steps_lib.make_train_step(graphdef, tx, mesh, state_shardings=shardings)
  detect_fn = steps_lib.make_eval_step(graphdef, config.eval, mesh,
                                       param_shardings=shardings["params"],
                                       rest_shardings=shardings["rest"])
  writer = log_lib.MetricWriter(workdir, start_step=start_step, enabled=is_main)
  plot_dir = os.path.join(workdir, "plots")

  def meta_at(step: int) -> dict[str, Any]:
    epoch, batch_in_epoch = divmod(step, spe)
    return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "steps_per_epoch": spe,
            "data": {**batches.get_state(), **data_layout},
            "skipped_steps": window.skipped_total, "config_name": config.name,
            "global_batch_size": batch_size}

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
  log_every = int(config.train.log_every)
  eval_every = int(config.train.eval_every)
  show_bar = log_lib.shows_progress_bar(bool(config.train.progress_bar))
  bar = log_lib.progress_bar(total=total_steps, desc="train", enabled=show_bar,
                             initial=start_step)
  window = MetricWindow(writer=writer, schedule=schedule, steps_per_epoch=spe,
                        total_steps=total_steps, batch_size=batch_size, nan_policy=nan_policy,
                        skipped_total=skipped_total, bar=bar, text_to_stderr=not show_bar)
  train_time = 0.0
  stop_error: BaseException | None = None

  try:
    with ckpt_lib.TerminationRequest((signal.SIGTERM, signal.SIGINT)) as term:
      t_loop = time.time()
      batches = input_pipeline.train_batches(
        train_ds, config.data, per_host_batch=per_host, start_step=data_position,
        num_steps=data_position + total_steps - step, shard_index=proc, shard_count=n_proc,
      )
      with batches:
        for batch in batches:
          gb = shard_lib.global_batch(batch, mesh)
          state, metrics = train_step(state, gb)
          step += 1
          window.add(step, metrics)
          bar.update(1)
          must_check = nan_policy == "stop" or (max_skips > 0 and window.consecutive_skips > 0)
          if must_check or step % log_every == 0 or step == total_steps:
            if nan_policy == "stop" and not bool(jax.device_get(metrics["finite"])):
              window.flush()
              raise NonFiniteLossError(
                f"non-finite loss ({float(metrics['loss'])}), gradient norm or updated "
                f"state at step {step}; stopping (train.nan_policy='stop'). Parameters were "
                f"not updated; the last checkpoint (step {checkpointer.latest_step()}) is "
                "intact. Try a lower optimizer.lr, optimizer.grad_clip_norm > 0, or check "
                "the data."
              )
            window.flush()
            if max_skips > 0 and window.consecutive_skips >= max_skips:
              raise NonFiniteLossError(
                f"{window.consecutive_skips} consecutive steps up to step {step} had a "
                f"non-finite loss, gradient or updated state and were skipped "
                f"(train.max_consecutive_nan_skips={max_skips}); stopping. The last "
                f"checkpoint (step {checkpointer.latest_step()}) is intact. Try a lower "
                "optimizer.lr or optimizer.grad_clip_norm > 0."
              )
          if checkpointer.due(step):
            _save_checkpoint(checkpointer, step, state, meta_at(step))
          if ckpt_lib.any_process(term.requested):
            window.flush()
            _save_checkpoint(checkpointer, step, state, meta_at(step))
            checkpointer.wait()
            signum = term.signum or signal.SIGTERM
            raise TrainingInterrupted(
              f"terminated by signal {signal.Signals(signum).name} at step {step}; "
              f"checkpoint saved in {checkpointer.directory}. Run again with --workdir "
              f"{workdir} to resume.",
              step, signum,
            )
          if eval_every and step % eval_every == 0 and step < total_steps:
            window.flush()
            t_eval = time.time()
            evaluate(step, final=False)
            window.pause(time.time() - t_eval)
          if step >= total_steps:
            break
      window.flush()
      jax.block_until_ready(state)
      train_time = time.time() - t_loop
      bar.close()
      if step > start_step and window.skipped_total - skipped_total == step - start_step:
        raise NonFiniteLossError(
          f"every step of this run ({start_step + 1}..{step}) was skipped as non-finite; "
          "nothing was trained or saved. Check optimizer and loss settings.")
      _save_checkpoint(checkpointer, step, state, meta_at(step))
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
      skipped_steps=window.skipped_total,
      resumed_from=start_step,
      train_images_per_s=(step - start_step) * batch_size / max(train_time, 1e-9)
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
    graphdef, abstract = steps_lib.abstract_state(config, tx, mesh)
    if step is None:
      step, state, meta = checkpointer.restore_latest(abstract)
    else:
      state, meta = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  detect_fn = steps_lib.make_eval_step(graphdef, config.eval, mesh,
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

