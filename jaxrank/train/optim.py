"""Optimiser and learning-rate schedule from the ``optimizer`` config section.

* SGD: ``optax.chain(clip_by_global_norm, add_decayed_weights(wd), sgd(lr, momentum))``:
  the weight decay is added to the gradient before momentum, exactly as
  ``torch.optim.SGD(weight_decay=wd)`` used by the published recipes.
* AdamW: ``optax.adamw`` (decoupled decay, scaled by the learning rate).
* Schedule: linear warmup from ``warmup_ratio * lr`` to ``lr`` over ``warmup_steps``
  (mmdet's ``warmup='linear'``), then step decay (``lr *= decay_factor`` at each of
  ``decay_steps``, or ``decay_epochs * steps_per_epoch``), cosine decay to
  ``min_lr_ratio * lr``, or constant.
* Linear scaling rule: with ``lr_reference_batch_size > 0`` the peak rate is
  ``lr * batch_size / lr_reference_batch_size``.
* Per-parameter rates: ``lr_multipliers`` pairs ``(pattern, m)`` multiply the update of every
  parameter whose path contains ``pattern`` (the first pattern that matches) by ``m``, which is
  exactly a PyTorch parameter group with rate ``m * lr`` for SGD and AdamW (Deformable DETR:
  ``backbone``, ``sampling_offsets`` and ``reference_points`` at 0.1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def peak_learning_rate(opt_config, global_batch_size: int) -> float:
  """``lr``, scaled linearly with the global batch when ``lr_reference_batch_size`` > 0."""
  lr = float(opt_config.lr)
  ref = int(opt_config.lr_reference_batch_size)
  return lr * global_batch_size / ref if ref > 0 else lr


def decay_boundaries(opt_config, steps_per_epoch: int) -> list[int]:
  """Steps at which the step schedule multiplies the rate by ``decay_factor``."""
  if len(opt_config.decay_steps):
    return [int(s) for s in opt_config.decay_steps]
  return [int(round(e * steps_per_epoch)) for e in opt_config.decay_epochs]


def learning_rate_schedule(
  opt_config, *, global_batch_size: int, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
  """Warmup + step / cosine / constant schedule (see the module docstring)."""
  peak = peak_learning_rate(opt_config, global_batch_size)
  warmup = int(opt_config.warmup_steps)
  ratio = float(opt_config.warmup_ratio)
  kind = opt_config.schedule
  if kind == "step":
    factor = float(opt_config.decay_factor)
    bounds = [b for b in decay_boundaries(opt_config, steps_per_epoch) if b > 0]
    main = optax.piecewise_constant_schedule(peak, {b: factor for b in bounds})
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(
      peak, max(1, total_steps - warmup), alpha=float(opt_config.min_lr_ratio)
    )
  elif kind == "constant":
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f"unknown optimizer.schedule {kind!r}")
  if warmup <= 0:
    return main
  if kind == "step":
    # mmdet: warmup_lr = regular_lr * (1 - (1 - ratio) * (1 - it / warmup)); the step
    # boundaries count from step 0, so the step schedule is not shifted.
    def schedule(step):
      step = jnp.asarray(step)
      frac = jnp.clip(step / warmup, 0.0, 1.0)
      return main(step) * (1.0 - (1.0 - ratio) * (1.0 - frac))

    return schedule
  warm = optax.linear_schedule(peak * ratio, peak, warmup)
  return optax.join_schedules([warm, main], [warmup])


def _decay_mask(params: Any) -> Any:
  """True for weights with two or more dimensions (kernels), False for biases/scales."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def scale_by_path(multipliers) -> optax.GradientTransformation:
  """Multiplies the update of each parameter whose path (``jax.tree_util.keystr``) contains a
  pattern of ``multipliers`` (``(pattern, m)`` pairs; the first match wins) by ``m``."""
  multipliers = tuple((str(p), float(m)) for p, m in multipliers)

  def update(updates, state, params=None):
    del params

    def scale(path, u):
      name = jax.tree_util.keystr(path)
      for pattern, m in multipliers:
        if pattern in name:
          return u * m
      return u

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(
  opt_config, *, global_batch_size: int, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``(optimizer, schedule)``."""
  schedule = learning_rate_schedule(
    opt_config,
    global_batch_size=global_batch_size,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
  )
  wd = float(opt_config.weight_decay)
  mask = None if opt_config.decay_norm_and_bias else _decay_mask
  parts = []
  if opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt_config.grad_clip_norm)))
  if opt_config.name == "sgd":
    if wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask))
    parts.append(
      optax.sgd(schedule, momentum=float(opt_config.momentum) or None,
                nesterov=bool(opt_config.nesterov))
    )
  elif opt_config.name == "adamw":
    parts.append(
      optax.adamw(
        schedule,
        b1=float(opt_config.momentum),
        b2=float(opt_config.b2),
        eps=float(opt_config.eps),
        weight_decay=wd,
        mask=mask,
      )
    )
  else:
    raise ValueError(f"unknown optimizer.name {opt_config.name!r}")
  multipliers = tuple(opt_config.get("lr_multipliers", ()))
  if multipliers:
    parts.append(scale_by_path(multipliers))
  return optax.chain(*parts), schedule
