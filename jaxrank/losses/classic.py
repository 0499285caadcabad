"""The baselines the ranking-loss papers compare against: focal, GIoU, L1 and smooth L1.

Element-wise losses in the optax style: they return per-element values (reduce them yourself,
e.g. with :func:`jaxrank.losses.weighted_mean`), and ``where=False`` entries are replaced by 0,
not sliced out. All are pure JAX; the focal and smooth-L1 losses compute what
``optax.sigmoid_focal_loss`` and ``optax.huber_loss(x, delta=β) / β`` compute.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxrank import losses
  >>> losses.l1_loss(jnp.array([1.0, -2.0]), jnp.array([0.5, 0.0]), where=jnp.array([True, False]))
  Array([0.5, 0. ], dtype=float32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrank.losses._common import check_where
from jaxrank.ops.boxes import aligned_giou


def _masked(values, where, *, name: str):
  return values if where is None else jnp.where(check_where(where, name=name), values, 0.0)


def sigmoid_focal_loss(logits, labels, *, alpha: float | None = 0.25, gamma: float = 2.0,
                       where=None):
  r"""Sigmoid focal loss (Lin et al., ICCV 2017), element-wise, as ``optax.sigmoid_focal_loss``.

  .. math:: FL(p_t) = -\alpha_t (1 - p_t)^\gamma \log p_t

  ``labels`` in {0, 1} (or soft); computed in float32. ``alpha=0.25, gamma=2`` as in RetinaNet;
  ``alpha=None`` leaves the classes unweighted. ``(1 - p_t)^γ`` is computed in log space.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxrank import losses
    >>> losses.sigmoid_focal_loss(jnp.array([3.0, -3.0]), jnp.array([1.0, 0.0])).round(5)
    Array([3.e-05, 8.e-05], dtype=float32)
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  cross_entropy = -labels * log_p - (1.0 - labels) * log_not_p
  log_one_minus_p_t = jax.scipy.special.logsumexp(jnp.stack([log_p, log_not_p], axis=-1), axis=-1,
                                                  b=jnp.stack([1.0 - labels, labels], axis=-1))
  loss = cross_entropy * jnp.exp(gamma * log_one_minus_p_t)
  if alpha is not None:
    loss = (alpha * labels + (1.0 - alpha) * (1.0 - labels)) * loss
  return _masked(loss, where, name="sigmoid_focal_loss")


def smooth_l1_loss(predictions, targets, *, beta: float = 1.0, where=None):
  r"""Smooth L1 (Huber scaled by ``1/β``), element-wise: ``optax.huber_loss(x, delta=β) / β``.

  .. math:: SL_1(x) = 0.5 x^2 / \beta \text{ if } |x| < \beta \text{ else } |x| - 0.5 \beta

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxrank import losses
    >>> losses.smooth_l1_loss(jnp.array([0.5, 3.0]), jnp.array([0.0, 0.0]), beta=1.0)
    Array([0.125, 2.5  ], dtype=float32)
  """
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  errors = jnp.abs(jnp.asarray(predictions, jnp.float32) - jnp.asarray(targets, jnp.float32))
  quadratic = jnp.minimum(errors, beta)
  huber = 0.5 * quadratic**2 + beta * (errors - quadratic)  # linear part: no doubled gradient at β
  return _masked(huber / beta, where, name="smooth_l1_loss")


def l1_loss(predictions, targets, *, where=None):
  """Element-wise absolute error ``|predictions - targets|`` (optax has no L1 loss)."""
  diff = jnp.asarray(predictions, jnp.float32) - jnp.asarray(targets, jnp.float32)
  return _masked(jnp.abs(diff), where, name="l1_loss")


def giou_loss(boxes, target_boxes, *, where=None):
  r"""GIoU loss ``1 - GIoU`` (Rezatofighi et al., CVPR 2019) of ``[..., 4]`` xyxy boxes.

  Returns ``[...]`` values in ``[0, 2]``. Example:

    >>> import jax.numpy as jnp
    >>> from jaxrank import losses
    >>> box = jnp.array([[0.0, 0.0, 2.0, 2.0]])
    >>> losses.giou_loss(box, box).round(4)
    Array([0.], dtype=float32)
  """
  return _masked(1.0 - aligned_giou(boxes, target_boxes), where, name="giou_loss")
