r"""Parameterized AP Loss (Tao et al., NeurIPS 2021), as the published code computes it.

PAP is ``1 - AP`` in which the step functions and the "true positive" indicator are replaced by
five searched monotone functions on ``[0, 1]``: ``f_H1`` and ``f_H2`` for the precision's
denominator and numerator steps, ``f_I1``, ``f_I2``, ``f_I3`` for the localisation quality
``u`` (e.g. ``(GIoU + 1) / 2``) of positives. Each function is the piecewise-linear
interpolation through 6 knots ``(0, 0), (x_1, y_1), ..., (x_4, y_4), (1, 1)`` (the published code
interpolates linearly, not with Bézier curves). Unlike the other ranking losses PAP is an
ordinary differentiable loss: gradients come from autodiff, the denominator is detached.

Also here: the search parametrisation of the knots (8 numbers in ``[0, 1]`` per function, plus
the localisation branch's gradient scale ``10^{2θ - 1}``), the searched values shipped with the
published configs (:data:`PRESETS`) and :func:`grad_scale`, the published ``GradScale``. The
search itself is :mod:`jaxrank.search`.

Reference:
  Tao et al., "Searching Parameterized AP Loss for Object Detection", NeurIPS 2021.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrank.losses._common import check_input, flatten, gather_positives, resolve_max_positives

Array = jax.Array

#: Clamp of ``Σ_j f_H1(x_ji)`` (the detached denominator) from below. The published code divides
#: by the raw sum (``inf``/NaN when it is 0); the shipped curves have ``f_H1(1/2) > 0`` so the
#: clamp only acts on degenerate searched curves.
DENOMINATOR_EPS = 1e-6
#: ``|P| + 1e-8`` normaliser, as published.
COUNT_EPS = 1e-8
#: Sampled ``θ`` are clipped to ``[THETA_EPS, 1 - THETA_EPS]`` before conversion to knots, so
#: that clipped samples at exactly 0 or 1 do not give repeated knots.
THETA_EPS = 1e-6
#: Order of the functions in the published ``ctrl_points`` and in the searched vector.
FUNCTION_ORDER = ("h2", "i2", "i3", "i1", "h1")
#: Elements of ``[B, P]`` blocks of the pairwise part (rows × positive slots) by default.
BLOCK_ELEMENTS = 1 << 20

NUM_KNOTS = 6
NUM_THETA = 8  # free numbers per function
NUM_SEARCH_PARAMS = len(FUNCTION_ORDER) * NUM_THETA + 1  # 41: one head


class PAPParams(NamedTuple):
  """The five PAP functions (knots ``[x0, y0, ..., x5, y5]``, shape ``[12]``) and the gradient
  scale of the localisation branch (the published ``reg_weight``, applied with
  :func:`grad_scale`). A pytree, so it can be traced or vmapped over.
  """
  h1: Array
  h2: Array
  i1: Array
  i2: Array
  i3: Array
  grad_scale: float | Array


# --------------------------------------------------------------------------------------------
# Piecewise-linear functions


def _clamp01(x):
  """Clamp to ``[0, 1]`` with gradient 1 on the closed interval (``torch.clamp``); ``jnp.clip``
  would halve the gradient at the bounds."""
  return jnp.where(x < 0, jnp.zeros_like(x), jnp.where(x > 1, jnp.ones_like(x), x))


def piecewise_linear(x, knots) -> Array:
  r"""Monotone piecewise-linear function through 6 knots, evaluated as published.

  .. math::
     f(x) = y_k + \frac{y_{k+1} - y_k}{x_{k+1} - x_k} (x - x_k), \qquad
     k = \#\{m : x_m < x\} - 1 \ (\text{clipped to } 0..4),

  i.e. the segment whose right knot is the first ``x_{k+1} >= x``; at ``x = 0`` the segment
  starting at the last knot equal to 0 (left-closed at 0). At an exact interior knot the value is
  continuous and the gradient is the **left** segment's slope, as published.

  Differences from the published ``_linear``: ``x`` outside ``[0, 1]`` is clamped (zero
  gradient there; the published code indexes out of range), and a zero-width segment
  (repeated ``x`` knots) has slope 0 instead of dividing by zero, so values and gradients stay
  finite for any monotone knots.

  Args:
    x: points, any shape and float dtype.
    knots: ``[12]`` = ``[x0, y0, ..., x5, y5]``, or ``[..., 12]`` whose leading dims broadcast
      against ``x``'s shape. Differentiable (the ``x`` knots only through the selected segment).

  Returns:
    ``f(x)`` with the broadcast shape, in float32 (float64 for float64 inputs).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxrank.losses import piecewise_linear
    >>> knots = jnp.array([0, 0, 0.5, 0.1, 0.6, 0.5, 0.7, 0.6, 0.9, 0.7, 1, 1])
    >>> [round(float(v), 4) for v in piecewise_linear(jnp.array([0.0, 0.25, 0.5, 0.95]), knots)]
    [0.0, 0.05, 0.1, 0.85]
  """
  x = jnp.asarray(x)
  knots = jnp.asarray(knots)
  if knots.shape[-1:] != (2 * NUM_KNOTS,):
    raise ValueError(f"knots must have shape [..., {2 * NUM_KNOTS}], got {knots.shape}")
  dtype = jnp.promote_types(jnp.result_type(x, knots), jnp.float32)
  x = _clamp01(x.astype(dtype))
  knots = knots.astype(dtype)
  kx, ky = knots[..., 0::2], knots[..., 1::2]
  rise = ky[..., 1:] - ky[..., :-1]
  width = kx[..., 1:] - kx[..., :-1]
  ok = width > 0
  slope = jnp.where(ok, rise / jnp.where(ok, width, 1.0), 0.0)  # [..., 5]
  # Sum of the segments' contributions (no gathers, so it vectorises): a passed segment adds
  # its rise (also a zero-width one: a jump), the segment containing x its slope times the
  # offset; the slope is taken on (x_k, x_{k+1}], i.e. the left segment at a knot. At x = 0
  # the published code is left-closed: jumps at 0 count and the slope is that of the first
  # segment of positive width (the extra zero-valued term gives that gradient).
  value = ky[..., 0]
  for k in range(NUM_KNOTS - 1):
    left, right = kx[..., k], kx[..., k + 1]
    passed = (x > right) | (right == 0)
    inside = (x > left) & ~passed
    value = value + jnp.where(passed, rise[..., k],
                              jnp.where(inside, slope[..., k] * (x - left), 0.0))
  zeros = jnp.sum(jnp.where(kx[..., 1:-1] == 0, 1, 0), axis=-1)
  slope_at_zero = jnp.take_along_axis(slope, zeros[..., None], axis=-1)[..., 0]
  knot_at_zero = jnp.take_along_axis(kx, zeros[..., None], axis=-1)[..., 0]  # = 0
  return value + jnp.where(x == 0, slope_at_zero * (x - knot_at_zero), 0.0)


# --------------------------------------------------------------------------------------------
# Search parametrisation


def knots_from_theta(theta, *, eps: float = THETA_EPS) -> Array:
  r"""Knots ``[..., 12]`` from the search parameters ``θ ∈ [0, 1]^8`` (``[..., 8]``).

  .. math::
     (x_1, y_1) = (θ_1, θ_2), \qquad
     (x_k, y_k) = (θ_{2k-1}, θ_{2k}) \odot (1 - (x_{k-1}, y_{k-1})) + (x_{k-1}, y_{k-1}),

  ``k = 2..4``, with ``(x_0, y_0) = (0, 0)`` and ``(x_5, y_5) = (1, 1)``: monotone knots for any
  ``θ``. ``θ = [0.2, 0.2, 0.25, 0.25, 1/3, 1/3, 0.5, 0.5]`` gives the identity. ``θ`` is
  clipped to ``[eps, 1 - eps]`` first (the published code does not clip; a sampled 0 or 1 gives
  repeated knots, which :func:`piecewise_linear` also tolerates). A NaN in a concrete ``θ`` is a
  ValueError; a traced one gives NaN knots, which make :func:`parameterized_ap_loss` NaN.
  """
  theta = jnp.asarray(theta)
  if theta.shape[-1:] != (NUM_THETA,):
    raise ValueError(f"theta must have shape [..., {NUM_THETA}], got {theta.shape}")
  check_input(lambda xp, t: xp.isnan(t).any(), theta, message="theta contains NaN")
  theta = theta.astype(jnp.promote_types(theta.dtype, jnp.float32))
  if eps > 0:
    theta = jnp.clip(theta, eps, 1.0 - eps)
  prev = jnp.zeros(theta.shape[:-1] + (2,), theta.dtype)
  points = [prev]
  for k in range(NUM_THETA // 2):
    prev = theta[..., 2 * k:2 * k + 2] * (1.0 - prev) + prev
    points.append(prev)
  points.append(jnp.ones_like(prev))
  return jnp.concatenate(points, axis=-1)


def theta_from_knots(knots) -> Array:
  """Inverse of :func:`knots_from_theta`: ``θ_k = (p_k - p_{k-1}) / (1 - p_{k-1})`` per
  coordinate, clipped to ``[0, 1]``; 1 where ``p_{k-1} = 1`` (any value gives the same knots).
  Only the 4 interior knots are read."""
  knots = jnp.asarray(knots)
  if knots.shape[-1:] != (2 * NUM_KNOTS,):
    raise ValueError(f"knots must have shape [..., {2 * NUM_KNOTS}], got {knots.shape}")
  knots = knots.astype(jnp.promote_types(knots.dtype, jnp.float32))
  prev = jnp.zeros(knots.shape[:-1] + (2,), knots.dtype)
  thetas = []
  for k in range(1, NUM_KNOTS - 1):
    point = knots[..., 2 * k:2 * k + 2]
    room = 1.0 - prev
    ok = room > 0
    thetas.append(jnp.where(ok, (point - prev) / jnp.where(ok, room, 1.0), 1.0))
    prev = point
  return jnp.clip(jnp.concatenate(thetas, axis=-1), 0.0, 1.0)


def reg_weight_from_theta(theta) -> Array:
  """Gradient scale ``10^{2θ - 1} ∈ [0.1, 10]`` (``θ = 0.5`` gives 1)."""
  theta = jnp.asarray(theta)
  return 10.0 ** (2.0 * theta.astype(jnp.promote_types(theta.dtype, jnp.float32)) - 1.0)


def theta_from_reg_weight(reg_weight) -> Array:
  """Inverse of :func:`reg_weight_from_theta`: ``(log10 w + 1) / 2``."""
  w = jnp.asarray(reg_weight)
  return (jnp.log10(w.astype(jnp.promote_types(w.dtype, jnp.float32))) + 1.0) / 2.0


def params_from_theta(theta, *, eps: float = THETA_EPS) -> PAPParams:
  """:class:`PAPParams` from one head's searched vector ``[..., 41]``.

  Layout as published: ``θ[8m : 8m + 8]`` for the functions in :data:`FUNCTION_ORDER` ``[H2,
  I2, I3, I1, H1]``, then ``θ[40]`` for the gradient scale ``10^{2θ - 1}``.
  """
  theta = jnp.asarray(theta)
  if theta.shape[-1:] != (NUM_SEARCH_PARAMS,):
    raise ValueError(f"theta must have shape [..., {NUM_SEARCH_PARAMS}], got {theta.shape}")
  funcs = {name: knots_from_theta(theta[..., NUM_THETA * m:NUM_THETA * (m + 1)], eps=eps)
           for m, name in enumerate(FUNCTION_ORDER)}
  return PAPParams(grad_scale=reg_weight_from_theta(theta[..., -1]), **funcs)


def theta_from_params(params: PAPParams) -> Array:
  """Inverse of :func:`params_from_theta`: the ``[..., 41]`` searched vector."""
  parts = [theta_from_knots(getattr(params, name)) for name in FUNCTION_ORDER]
  scale = theta_from_reg_weight(params.grad_scale)
  return jnp.concatenate(parts + [scale[..., None]], axis=-1)


def faster_rcnn_params_from_theta(theta, *, eps: float = THETA_EPS) -> tuple[PAPParams, PAPParams]:
  """``(rpn, rcnn)`` from the published Faster R-CNN vector ``[..., 82]``: the 5 RPN then the 5
  R-CNN functions (8 numbers each), then the RPN and the R-CNN gradient scales."""
  theta = jnp.asarray(theta)
  n = len(FUNCTION_ORDER) * NUM_THETA
  if theta.shape[-1:] != (2 * n + 2,):
    raise ValueError(f"theta must have shape [..., {2 * n + 2}], got {theta.shape}")
  rpn = jnp.concatenate([theta[..., :n], theta[..., 2 * n:2 * n + 1]], axis=-1)
  rcnn = jnp.concatenate([theta[..., n:2 * n], theta[..., 2 * n + 1:]], axis=-1)
  return params_from_theta(rpn, eps=eps), params_from_theta(rcnn, eps=eps)


def theta_from_faster_rcnn_params(rpn: PAPParams, rcnn: PAPParams) -> Array:
  """Inverse of :func:`faster_rcnn_params_from_theta`."""
  a, b = theta_from_params(rpn), theta_from_params(rcnn)
  return jnp.concatenate([a[..., :-1], b[..., :-1], a[..., -1:], b[..., -1:]], axis=-1)


def _preset(h2, i2, i3, i1, h1, grad_scale) -> PAPParams:
  def knots(v):
    a = np.asarray(v, np.float32)
    a.setflags(write=False)
    return a
  return PAPParams(h1=knots(h1), h2=knots(h2), i1=knots(i1), i2=knots(i2), i3=knots(i3),
                   grad_scale=float(grad_scale))


#: The searched functions and gradient scales shipped in the published configs
#: (``configs/paploss/paploss_{retinanet,fasterrcnn}_r50_fpn.py``), and the identity functions
#: (the search's starting point) with scale 1.
PRESETS: dict[str, PAPParams] = {
    "retinanet": _preset(
        h2=[0, 0, 0.4182, 0.0277, 0.4948, 0.2187, 0.6882, 0.2624, 0.802, 0.6688, 1, 1],
        i2=[0, 0, 0.1279, 0.3696, 0.3056, 0.4708, 0.5198, 0.529, 0.6983, 0.6709, 1, 1],
        i3=[0, 0, 0.0931, 0.0289, 0.3607, 0.5585, 0.4823, 0.7131, 0.6291, 0.8162, 1, 1],
        i1=[0, 0, 0.4914, 0.1499, 0.5492, 0.1664, 0.6259, 0.3051, 0.7945, 0.6195, 1, 1],
        h1=[0, 0, 0.413, 0.0798, 0.4356, 0.3571, 0.5361, 0.7063, 0.8097, 0.9083, 1, 1],
        grad_scale=4.1231),
    "faster_rcnn_rpn": _preset(
        h2=[0, 0, 0.9058, 0.0484, 0.9068, 0.5120, 0.9232, 0.7286, 0.9766, 0.9677, 1, 1],
        i2=[0, 0, 0.3200, 0.1084, 0.3493, 0.2482, 0.4924, 0.3869, 0.7231, 0.6510, 1, 1],
        i3=[0, 0, 0.0935, 0.0419, 0.2177, 0.1168, 0.5857, 0.3748, 0.7962, 0.6683, 1, 1],
        i1=[0, 0, 0.0045, 0.3599, 0.1295, 0.4603, 0.7662, 0.5140, 0.8483, 0.5259, 1, 1],
        h1=[0, 0, 0.1764, 0.1081, 0.5245, 0.4907, 0.6956, 0.5668, 0.7642, 0.8645, 1, 1],
        grad_scale=1.6950),
    "faster_rcnn_rcnn": _preset(
        h2=[0, 0, 0.3344, 0.0268, 0.5460, 0.2461, 0.8196, 0.6466, 0.9467, 0.8617, 1, 1],
        i2=[0, 0, 0.0978, 0.2019, 0.4073, 0.3367, 0.6337, 0.4689, 0.7708, 0.6633, 1, 1],
        i3=[0, 0, 0.2406, 0.0515, 0.3358, 0.5259, 0.6047, 0.6647, 0.8575, 0.7792, 1, 1],
        i1=[0, 0, 0.2574, 0.2363, 0.5442, 0.5999, 0.7165, 0.6548, 0.8728, 0.8331, 1, 1],
        h1=[0, 0, 0.1551, 0.2675, 0.4902, 0.3957, 0.7245, 0.5095, 0.8068, 0.8720, 1, 1],
        grad_scale=7.1324),
    "identity": _preset(*([[0, 0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1, 1]] * 5),
                        grad_scale=1.0),
}

#: ``θ`` of one function whose knots are the identity (the published search's initial mean).
IDENTITY_THETA = (0.2, 0.2, 0.25, 0.25, 1 / 3, 1 / 3, 0.5, 0.5)


# --------------------------------------------------------------------------------------------
# Gradient scale


@jax.custom_vjp
def grad_scale(x, scale):
  """Identity forward; the backward multiplies the cotangent by ``scale`` (published
  ``GradScale``, applied to ``bbox_pred`` with ``scale = reg_weight``). ``x`` may be a pytree;
  ``scale`` gets no gradient.

  Example:
    >>> import jax
    >>> from jaxrank.losses import grad_scale
    >>> float(jax.grad(lambda x: 3.0 * grad_scale(x, 4.0))(1.0))
    12.0
  """
  return x


def _grad_scale_fwd(x, scale):
  return x, scale


def _grad_scale_bwd(scale, g):
  scaled = jax.tree.map(lambda t: (t * scale).astype(t.dtype), g)
  return scaled, jnp.zeros_like(scale)


grad_scale.defvjp(_grad_scale_fwd, _grad_scale_bwd)


# --------------------------------------------------------------------------------------------
# The loss


def _decreasing_knots(xp, knots):
  """True when the ``x`` or the ``y`` knots decrease somewhere or are NaN."""
  rising = lambda k: (xp.diff(k, axis=-1) >= 0).all()
  return ~(rising(knots[..., 0::2]) & rising(knots[..., 1::2]))


def _nan_quality_at_positive(xp, targets, quality, where):
  positive = (targets > 0) & xp.broadcast_to(xp.asarray(where, bool), targets.shape)
  return (positive & xp.isnan(quality.astype(xp.float32))).any()


def _knots(params: PAPParams):
  """The five knot vectors as float32, and the traced flag of non-monotone or NaN knots."""
  if not isinstance(params, PAPParams):
    raise TypeError("parameterized_ap_loss: params must be a PAPParams (e.g. "
                    "PRESETS['retinanet'] or params_from_theta(theta)), "
                    f"got {type(params).__name__}")
  out = {}
  invalid = jnp.zeros((), bool)
  for name in FUNCTION_ORDER:
    k = jnp.asarray(getattr(params, name)).astype(jnp.float32)
    if k.shape != (2 * NUM_KNOTS,):
      raise ValueError(f"parameterized_ap_loss: params.{name} must have shape [12], got {k.shape}")
    invalid = invalid | check_input(
        _decreasing_knots, getattr(params, name),
        message=f"parameterized_ap_loss: params.{name} knots must be non-decreasing in x and y "
                "and not NaN")
    out[name] = k
  return out, invalid


def _block_rows(block_rows, rows: int, slots: int) -> int:
  if block_rows is None:
    block_rows = max(8, BLOCK_ELEMENTS // max(slots, 1))
  block_rows = int(block_rows)
  if block_rows < 1:
    raise ValueError(f"parameterized_ap_loss: block_rows must be >= 1, got {block_rows}")
  return min(block_rows, rows)


def _pair_sums(row_s, row_w, row_m, col_s, h2, h1, ends):
  """``(Σ_j f_H2(x_ji) w_j, Σ_j m_j f_H1(x_ji))`` over one block of rows, ``[P]`` each.

  Blocks entirely below (``x < 0``) or above (``x > 1``) every positive are done in O(B): ``x``
  is clamped there, so only ``f(0)`` or ``f(1)`` (``ends = [[f_H2(0), f_H1(0)], [f_H2(1),
  f_H1(1)]]``) enters and the logits get no gradient.
  """
  row_max = jnp.max(jnp.where(row_m > 0, row_s, -jnp.inf))
  row_min = jnp.min(jnp.where(row_m > 0, row_s, jnp.inf))
  all_below = (row_max - col_s[0]) / 2 + 0.5 < 0   # col_s ascending
  all_above = (row_min - col_s[-1]) / 2 + 0.5 > 1

  def dense(row_s, row_w, row_m, col_s, ends):
    x = _clamp01((row_s[:, None] - col_s[None, :]) / 2 + 0.5)
    num = jnp.sum(piecewise_linear(x, h2) * row_w[:, None], axis=0)
    den = jnp.sum(lax.stop_gradient(piecewise_linear(x, h1)) * row_m[:, None], axis=0)
    return num, den

  def constant(end):
    def branch(row_s, row_w, row_m, col_s, ends):
      num = ends[end, 0] * jnp.sum(row_w)
      den = ends[end, 1] * jnp.sum(row_m)
      return jnp.broadcast_to(num, col_s.shape), jnp.broadcast_to(den, col_s.shape)
    return branch

  which = jnp.where(all_below, 1, jnp.where(all_above, 2, 0))
  return lax.switch(which, [dense, constant(0), constant(1)], row_s, row_w, row_m, col_s, ends)


def parameterized_ap_loss(logits, targets, quality, params: PAPParams, *, top_k: int = 100_000,
                          where=None, max_positives: int | None = None,
                          block_rows: int | None = None) -> Array:
  r"""Parameterized AP Loss (Tao et al., 2021), as in the published ``paploss``.

  With ``S`` the ``top_k`` highest-scored valid entries (positives and negatives, all classes),
  ``P`` all positives (also those outside ``S``), ``x_{ji} = clip((s_j - s_i)/2 + 1/2, 0, 1)``
  and ``u`` the localisation quality (0 at negatives):

  .. math::
     \ell_i = (1 - f_{I1}(u_i)) + \frac{\sum_{j \in S} f_{H2}(x_{ji}) (1 - f_{I2}(u_j)) f_{I3}(u_i)}
                                       {\sum_{j \in S} \mathrm{sg}[f_{H1}(x_{ji})]}, \qquad
     \mathcal{L}_{PAP} = \frac{\sum_{i \in P} \ell_i}{|P| + 10^{-8}},

  including the self pair ``j = i`` (``x = 1/2``) when ``i ∈ S``. Gradients are plain autodiff:
  through ``f_H2`` to both logits of a pair, and through ``f_I1``, ``f_I2``, ``f_I3`` to ``u``
  (and to the knots of those four functions); the ``f_H1`` denominator is detached.
  ``clip`` passes the gradient on the closed interval, like ``torch.clamp``.

  Cost: ``O(k·P)`` time with ``k = min(top_k, N)``, ``P = max_positives``; memory ``O(B·P + k +
  N)`` forward and reverse (rows in blocks of ``B``, each block rematerialised in the backward
  pass). Blocks of rows all more than 1 below the lowest positive logit, or all more than 1
  above the highest, cost ``O(B)`` (there ``x`` is clamped to 0 or 1).

  Differences from the published code:

  * ``targets > 0`` marks a positive (published: ``== 1``).
  * Ties at the ``top_k`` boundary keep the lower flat index (``lax.top_k``); ``torch.topk``'s
    tie order is unspecified. Only matters with more than ``top_k`` valid entries.
  * ``Σ_j f_H1(x_ji)`` is clamped to :data:`DENOMINATOR_EPS` (published: division by zero).
  * Knots with repeated ``x`` and inputs outside ``[0, 1]`` are handled as in
    :func:`piecewise_linear`.

  Args:
    logits: scores of any shape (raw logits). Any float dtype; computed in float32.
    targets: same shape; ``> 0`` positive, ``0`` negative, ``< 0`` (the published ``-1``)
      ignored.
    quality: same shape; the localisation quality ``u ∈ [0, 1]`` of each positive (published:
      ``(GIoU(pred, gt) + 1) / 2``), differentiable; read only at positives (0 elsewhere).
    params: :class:`PAPParams` (e.g. ``PRESETS["retinanet"]``); ``grad_scale`` is not used here,
      apply it to the box branch with :func:`grad_scale`.
    top_k: number of rows ``k`` (the published ``num_topk = 1e5``); static.
    where: optional boolean mask broadcastable to ``logits``; ``False`` ignores an entry.
    max_positives: static number of positive slots (see :func:`jaxrank.losses.ap_loss`); more
      positives than slots gives a NaN loss.
    block_rows: rows per block of the pairwise part (default: about ``2^20 / max_positives``).

  Returns:
    The scalar loss (float32): 0 with zero gradient when there are no positives, NaN when a
    non-ignored logit is not finite or positives overflow ``max_positives``.

  Raises:
    TypeError: ``params`` is not a :class:`PAPParams` (e.g. a dict).
    ValueError: NaN ``targets``, a NaN ``quality`` at a positive, or knots of ``params`` that
      decrease (in ``x`` or ``y``) or are NaN (e.g. ``params_from_theta`` of a NaN ``θ``), when
      these inputs are concrete. Traced (under ``jit``, ``vmap`` over params), the loss is NaN
      instead.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxrank import losses
    >>> logits = jnp.array([2.0, 1.0, 0.5, -1.0])
    >>> targets = jnp.array([1.0, 0.0, 1.0, 0.0])
    >>> quality = jnp.array([0.9, 0.0, 0.6, 0.0])
    >>> params = losses.PRESETS["identity"]
    >>> round(float(losses.parameterized_ap_loss(logits, targets, quality, params)), 4)
    0.435
    >>> g = jax.grad(losses.parameterized_ap_loss, argnums=(0, 2))(logits, targets, quality, params)
    >>> bool(g[1][0] < 0)  # better boxes lower the loss
    True
  """
  name = "parameterized_ap_loss"
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
    raise ValueError(f"{name}: top_k must be a positive int (static), got {top_k!r}")
  flat = flatten(logits, targets, where, name=name, extra={"quality": quality})
  if not jnp.issubdtype(jnp.asarray(quality).dtype, jnp.floating):
    raise TypeError(f"{name}: quality must be floating point, got {jnp.asarray(quality).dtype}")
  knots, invalid = _knots(params)
  invalid = invalid | check_input(_nan_quality_at_positive, targets, quality,
                                  True if where is None else where,
                                  message=f"{name}: quality is NaN at a positive")
  slots = resolve_max_positives(max_positives, targets, name=name)
  pos = gather_positives(flat, slots)
  u = jnp.where(flat.positive, jnp.asarray(quality).astype(jnp.float32).reshape(-1), 0.0)
  valid = flat.positive | flat.negative

  # Rows: the top-k valid entries by logit (descending).
  num_entries = flat.logits.shape[0]
  k = min(int(top_k), num_entries)
  masked = jnp.where(valid, lax.stop_gradient(flat.logits), -jnp.inf)
  _, rows = lax.top_k(masked, k)
  row_m = valid[rows].astype(jnp.float32)
  row_s = jnp.where(row_m > 0, flat.logits[rows], 0.0)
  row_w = (1.0 - piecewise_linear(u[rows], knots["i2"])) * row_m

  block = _block_rows(block_rows, k, slots)
  num_blocks = -(-k // block)
  pad = num_blocks * block - k
  if pad:
    row_s, row_w, row_m = (jnp.concatenate([a, jnp.zeros(pad, jnp.float32)])
                           for a in (row_s, row_w, row_m))
  xs = tuple(a.reshape(num_blocks, block) for a in (row_s, row_w, row_m))
  col_s = pos.logits
  body = jax.checkpoint(_pair_sums)
  ends = jnp.stack([piecewise_linear(jnp.array([0.0, 1.0]), knots["h2"]),
                    lax.stop_gradient(piecewise_linear(jnp.array([0.0, 1.0]), knots["h1"]))],
                   axis=1)

  def step(carry, x):
    num, den = body(*x, col_s, knots["h2"], knots["h1"], ends)
    return (carry[0] + num, carry[1] + den), None

  zero = jnp.zeros(slots, jnp.float32)
  (num, den), _ = lax.scan(step, (zero, zero), xs)

  col_u = jnp.where(pos.mask, u[pos.index], 0.0)
  ell = ((1.0 - piecewise_linear(col_u, knots["i1"]))
         + num * piecewise_linear(col_u, knots["i3"]) / jnp.maximum(den, DENOMINATOR_EPS))
  loss = jnp.sum(jnp.where(pos.mask, ell, 0.0)) / (pos.count.astype(jnp.float32) + COUNT_EPS)
  bad = (~flat.finite) | flat.invalid | invalid | pos.overflow
  return jnp.where(bad, jnp.nan, loss)
