"""The baselines the ranking-loss papers compare against: focal, GIoU, L1 and smooth L1.

Element-wise losses in the optax style: they return per-element values (reduce them yourself,
e.g. with :func:`jaxrank.losses.weighted_mean`), and ``where=False`` entries are replaced by 0,
not sliced out. The focal and smooth-L1 losses are optax's (imported when first called, so that
``jaxrank.losses`` itself needs only jax); GIoU has no optax counterpart.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxrank.ops.boxes import aligned_giou


def _optax():
  try:
    import optax  # noqa: PLC0415 - optional dependency
  except ImportError as e:
    raise ImportError("this loss uses optax: pip install 'jaxrank[train]' or 'optax'") from e
  return optax


def _masked(values, where):
  return values if where is None else jnp.where(where, values, 0.0)


def sigmoid_focal_loss(logits, labels, *, alpha: float | None = 0.25, gamma: float = 2.0, where=None):
  r"""Sigmoid focal loss (Lin et al., ICCV 2017), element-wise: ``optax.sigmoid_focal_loss``.

  .. math:: FL(p_t) = -\alpha_t (1 - p_t)^\gamma \log p_t

  ``labels`` in {0, 1} (or soft); computed in float32. ``alpha=0.25, gamma=2`` as in RetinaNet.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxrank import losses
    >>> losses.sigmoid_focal_loss(jnp.array([3.0, -3.0]), jnp.array([1.0, 0.0])).round(5)
    Array([3.e-05, 8.e-05], dtype=float32)
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  return _masked(_optax().sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma), where)


def smooth_l1_loss(predictions, targets, *, beta: float = 1.0, where=None):
  r"""Smooth L1 (Huber scaled by ``1/β``), element-wise: ``optax.huber_loss(x, delta=β) / β``.

  .. math:: SL_1(x) = 0.5 x^2 / \beta \text{ if } |x| < \beta \text{ else } |x| - 0.5 \beta
  """
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  predictions = jnp.asarray(predictions, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  return _masked(_optax().huber_loss(predictions, targets, delta=beta) / beta, where)


def l1_loss(predictions, targets, *, where=None):
  """Element-wise absolute error ``|predictions - targets|`` (optax has no L1 loss)."""
  diff = jnp.asarray(predictions, jnp.float32) - jnp.asarray(targets, jnp.float32)
  return _masked(jnp.abs(diff), where)


def giou_loss(boxes, target_boxes, *, where=None):
  r"""GIoU loss ``1 - GIoU`` (Rezatofighi et al., CVPR 2019) of ``[..., 4]`` xyxy boxes.

  Returns ``[...]`` values in ``[0, 2]``. Example:

    >>> import jax.numpy as jnp
    >>> from jaxrank import losses
    >>> box = jnp.array([[0.0, 0.0, 2.0, 2.0]])
    >>> losses.giou_loss(box, box).round(4)
    Array([0.], dtype=float32)
  """
  return _masked(1.0 - aligned_giou(boxes, target_boxes), where)
