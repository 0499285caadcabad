"""Multi-scale deformable attention, the core of Deformable DETR (Zhu et al., ICLR 2021).

Semantics of ``ms_deform_attn_core_pytorch`` (fundamentalvision/Deformable-DETR,
``models/ops/functions/ms_deform_attn_func.py``): every query, head, level and point samples
its level's value map with ``grid_sample(value_l, 2 * loc - 1, mode="bilinear",
padding_mode="zeros", align_corners=False)``, and the samples are summed with the attention
weights. Jit-able with static shapes; gradients flow to the values, the sampling locations
(through the bilinear weights) and the attention weights.

Two formulations give the same result:

* ``"gather"``: one gather from the flattened ``[B * S * heads, head_dim]`` values for the four
  bilinear corners of every sample of every level, weighted by ``bilinear * attention *
  in-bounds`` and summed. Cost ``O(B * Q * heads * L * points * head_dim)``, independent of
  the map sizes. The gathered ``[B, Q, heads, 4 * L * points, head_dim]`` block is the large
  intermediate (XLA on CPU materialises it: 0.7 GiB forward, 1.4 GiB forward + backward for
  B=2, Q=S=5440, 8 heads, 4 levels x 4 points, head_dim 32); ``jax.checkpoint`` keeps it out
  of the residuals saved for the backward pass, which gathers again.
* ``"onehot"``: per level and per ``(batch, head)`` a dense ``[Q, H_l * W_l]`` matrix of the
  bilinear weights (built separably from ``[Q, points, H_l]`` and ``[Q, points, W_l]``
  factors) times the ``[H_l * W_l, head_dim]`` values: matmuls only, no gather, at
  ``O(B * heads * Q * S * head_dim)`` flops and ``B * heads * Q * S`` memory. Suited to
  accelerators with slow gathers (TPU) when ``Q * S`` is small.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("auto", "gather", "onehot")
#: ``method="auto"`` on TPU uses ``"onehot"`` while ``Q * S`` (the dense bilinear matrix of one
#: batch element and head) is at most this: 8 Mi entries (32 MiB in float32), which covers the
#: Deformable DETR decoder (300 queries x ~22k positions at 800 x 1333) but not the encoder
#: (Q = S).
ONEHOT_MAX_QUERY_TIMES_POSITIONS = 1 << 23


def _is_int(value) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_spatial_shapes(spatial_shapes, num_positions: int) -> tuple[tuple[int, int], ...]:
  try:
    shapes = tuple(tuple(level) for level in spatial_shapes)
  except TypeError:
    shapes = None
  if (not shapes or not all(len(level) == 2 and all(_is_int(n) and n > 0 for n in level)
                            for level in shapes)):
    raise ValueError("spatial_shapes must be a static, non-empty sequence of (H_l, W_l) pairs "
                     f"of positive ints, got {spatial_shapes!r}.")
  shapes = tuple((int(h), int(w)) for h, w in shapes)
  total = sum(h * w for h, w in shapes)
  if total != num_positions:
    raise ValueError(f"spatial_shapes {shapes} hold sum(H_l * W_l) = {total} positions but "
                     f"value has S = {num_positions}.")
  return shapes


def _check_inputs(value, sampling_locations, attention_weights, spatial_shapes):
  value = jnp.asarray(value)
  sampling_locations = jnp.asarray(sampling_locations)
  attention_weights = jnp.asarray(attention_weights)
  if value.ndim != 4:
    raise ValueError(f"value must be [B, S, heads, head_dim], got shape {value.shape}.")
  for name, array in (("value", value), ("sampling_locations", sampling_locations),
                      ("attention_weights", attention_weights)):
    if not jnp.issubdtype(array.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {array.dtype}.")
  batch, num_positions, heads, _ = value.shape
  shapes = _check_spatial_shapes(spatial_shapes, num_positions)
  loc_shape = sampling_locations.shape
  if (len(loc_shape) != 6 or loc_shape[-1] != 2 or loc_shape[0] != batch
      or loc_shape[2] != heads or loc_shape[3] != len(shapes)):
    raise ValueError(
        "sampling_locations must be [B, Q, heads, L, points, 2] with B, heads from value and L "
        f"= len(spatial_shapes) = {len(shapes)}, got shape {loc_shape} for value "
        f"{value.shape}.")
  if attention_weights.shape != loc_shape[:-1]:
    raise ValueError(f"attention_weights must be [B, Q, heads, L, points] = {loc_shape[:-1]}, "
                     f"got shape {attention_weights.shape}.")
  return value, sampling_locations, attention_weights, shapes


def _weight_dtype(sampling_locations, attention_weights):
  return jnp.promote_types(jnp.promote_types(sampling_locations.dtype, attention_weights.dtype),
                           jnp.float32)


def _axis_corners(coord, size):
  """Floor corner and the two bilinear weights along one axis, zero for corners outside.

  ``coord`` in pixel units (pixel centres at integers). A NaN coordinate gives NaN weights
  (not an out-of-bounds zero); an infinite one is outside (zero).
  """
  low = jnp.floor(coord)
  frac = coord - low
  w_low = jnp.where((low >= 0) & (low <= size - 1), 1.0 - frac, 0.0)
  w_high = jnp.where((low >= -1) & (low <= size - 2), frac, 0.0)
  is_nan = jnp.isnan(coord)
  return low, jnp.where(is_nan, coord, w_low), jnp.where(is_nan, coord, w_high)


def _gather_weighted_sum(flat_value, index, weight):
  """``sum_k weight[..., k] * flat_value[index[..., k]]``."""
  gathered = flat_value.at[index].get(mode="promise_in_bounds")
  return jnp.einsum("...kd,...k->...d", gathered, weight)


def _deform_attn_gather(value, shapes, sampling_locations, attention_weights):
  batch, num_positions, heads, head_dim = value.shape
  num_queries = sampling_locations.shape[1]
  dtype = _weight_dtype(sampling_locations, attention_weights)
  locations = sampling_locations.astype(dtype)
  heights = np.array([h for h, _ in shapes], np.float32)[:, None]  # [L, 1] against points
  widths = np.array([w for _, w in shapes], np.float32)[:, None]
  starts = np.cumsum([0] + [h * w for h, w in shapes[:-1]]).astype(np.int32)[:, None]
  x = locations[..., 0] * widths - 0.5  # [B, Q, heads, L, points]
  y = locations[..., 1] * heights - 0.5
  x_low, wx_low, wx_high = _axis_corners(x, widths)
  y_low, wy_low, wy_high = _axis_corners(y, heights)
  x_corner = jnp.stack([x_low, x_low + 1.0, x_low, x_low + 1.0], axis=-1)
  y_corner = jnp.stack([y_low, y_low, y_low + 1.0, y_low + 1.0], axis=-1)
  weight = jnp.stack([wy_low * wx_low, wy_low * wx_high, wy_high * wx_low, wy_high * wx_high],
                     axis=-1) * attention_weights.astype(dtype)[..., None]
  inside = ((x_corner >= 0) & (x_corner <= widths[..., None] - 1) & (y_corner >= 0)
            & (y_corner <= heights[..., None] - 1))
  # Out-of-map corners (and NaN locations) read position 0; their weight is 0 (or NaN).
  x_corner = jnp.where(inside, x_corner, 0.0).astype(jnp.int32)
  y_corner = jnp.where(inside, y_corner, 0.0).astype(jnp.int32)
  position = starts[..., None] + y_corner * widths.astype(np.int32)[..., None] + x_corner
  batch_base = (np.arange(batch, dtype=np.int32) * num_positions)[:, None, None, None, None, None]
  head_offset = np.arange(heads, dtype=np.int32)[:, None, None, None]
  index = (batch_base + position) * heads + head_offset  # [B, Q, heads, L, points, 4]
  fold = (batch, num_queries, heads, -1)
  # Read in the accumulation dtype, so the value gradient's scatter-add is in it too.
  flat_value = value.reshape(batch * num_positions * heads, head_dim).astype(dtype)
  out = jax.checkpoint(_gather_weighted_sum)(flat_value, index.reshape(fold),
                                             weight.reshape(fold))
  return out.reshape(batch, num_queries, heads * head_dim)


def _axis_factor(coord, size: int):
  """``[..., size]`` bilinear weights of every pixel along one axis (zero outside the map)."""
  low, w_low, w_high = _axis_corners(coord, size)
  pixels = jnp.arange(size, dtype=coord.dtype)
  low = low[..., None]
  factor = (jnp.where(pixels == low, w_low[..., None], 0.0)
            + jnp.where(pixels == low + 1.0, w_high[..., None], 0.0))
  return jnp.where(jnp.isnan(coord)[..., None], coord[..., None], factor)


def _deform_attn_onehot(value, shapes, sampling_locations, attention_weights):
  batch, _, heads, head_dim = value.shape
  num_queries = sampling_locations.shape[1]
  dtype = _weight_dtype(sampling_locations, attention_weights)
  locations = sampling_locations.astype(dtype)
  attention = attention_weights.astype(dtype)
  out = jnp.zeros((batch, num_queries, heads, head_dim), dtype)
  start = 0
  for level, (height, width) in enumerate(shapes):
    value_l = value[:, start:start + height * width].reshape(batch, height, width, heads,
                                                             head_dim)
    start += height * width
    # [B, Q, heads, points, W] and [..., H] factors; the attention folds into the rows.
    factor_x = _axis_factor(locations[:, :, :, level, :, 0] * width - 0.5, width)
    factor_y = _axis_factor(locations[:, :, :, level, :, 1] * height - 0.5, height)
    factor_y = factor_y * attention[:, :, :, level, :, None]
    dense = jnp.einsum("bqmph,bqmpw->bmqhw", factor_y, factor_x)
    out = out + jnp.einsum("bmqhw,bhwmd->bqmd", dense, value_l.astype(dtype),
                           preferred_element_type=dtype)
  return out.reshape(batch, num_queries, heads * head_dim)


def choose_method(num_queries: int, num_positions: int, backend: str | None = None) -> str:
  """The formulation ``method="auto"`` uses: ``"onehot"`` on TPU while ``Q * S`` is at most
  :data:`ONEHOT_MAX_QUERY_TIMES_POSITIONS`, else ``"gather"``."""
  backend = jax.default_backend() if backend is None else backend
  if backend == "tpu" and num_queries * num_positions <= ONEHOT_MAX_QUERY_TIMES_POSITIONS:
    return "onehot"
  return "gather"


def multi_scale_deformable_attention(value, spatial_shapes: Sequence[tuple[int, int]],
                                     sampling_locations, attention_weights, *,
                                     method: str = "auto"):
  """Multi-scale deformable attention (Deformable DETR's ``ms_deform_attn_core_pytorch``).

  Args:
    value: ``[B, S, heads, head_dim]``, the levels' maps flattened row-major and concatenated
      in level order, ``S = sum(H_l * W_l)``.
    spatial_shapes: static ``((H_0, W_0), ..., (H_{L-1}, W_{L-1}))`` ints.
    sampling_locations: ``[B, Q, heads, L, points, 2]`` ``(x, y)`` normalised to the map,
      ``(0, 0)`` its top-left and ``(1, 1)`` its bottom-right corner.
    attention_weights: ``[B, Q, heads, L, points]`` (softmax-normalised by the caller).
    method: ``"gather"``, ``"onehot"`` (see the module docstring) or ``"auto"``:
      :func:`choose_method` with ``jax.default_backend()``: ``"gather"`` on CPU and GPU (fast
      gathers, memory independent of the map sizes); on TPU ``"onehot"`` while ``Q * S <=``
      :data:`ONEHOT_MAX_QUERY_TIMES_POSITIONS` (MXU matmuls instead of slow gathers; e.g. the
      decoder), ``"gather"`` above (the dense matrices would grow with ``Q * S``, e.g. the
      encoder where ``Q = S``).

  Returns:
    ``[B, Q, heads * head_dim]`` in value's dtype (head-major, as the reference):
    ``sum_{l, p} attention_weights[b, q, m, l, p] * bilinear(value_l[b, :, :, m], x, y)`` at
    pixel coordinates ``x = loc_x * W_l - 0.5``, ``y = loc_y * H_l - 0.5`` (pixel centres at
    integers); each of the four neighbours outside the map contributes zero, so a location
    half a pixel or more outside ``[0, 1]`` (``x <= -1`` or ``x >= W_l``, same for ``y``)
    gives zero. Interpolation weights and sums are in float32 (or the inputs' wider float
    type): bfloat16 values are accumulated in float32 and the result cast back, and so is
    their gradient. A NaN location or attention weight gives NaN for its ``(b, q, head)``;
    an infinite location is outside every map (zero). On TPU the ``"onehot"`` matmuls run at
    the default matmul precision (``jax_default_matmul_precision``).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  value, sampling_locations, attention_weights, shapes = _check_inputs(
      value, sampling_locations, attention_weights, spatial_shapes)
  if method == "auto":
    method = choose_method(sampling_locations.shape[1], value.shape[1])
  fn = _deform_attn_gather if method == "gather" else _deform_attn_onehot
  return fn(value, shapes, sampling_locations, attention_weights).astype(value.dtype)
