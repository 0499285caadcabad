"""The deformable transformer of Deformable DETR (Zhu et al., ICLR 2021) in Flax NNX.

Post-norm encoder and decoder layers with multi-scale deformable attention
(:func:`jaxrank.ops.multi_scale_deformable_attention`), sine position embeddings, and the
published initialisations (``models/deformable_transformer.py`` and
``models/ops/modules/ms_deform_attn.py`` of fundamentalvision/Deformable-DETR). Dropout takes an
explicit key (``None``: off), so a training step is a pure function of its inputs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrank import ops
from jaxrank.models.layers import xavier_uniform

zeros = nnx.initializers.zeros


class Linear(nnx.Module):
  """``y = x W + b`` with float32 weights, computed in ``dtype``."""

  def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32,
               kernel_init=xavier_uniform, bias_init=zeros, rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), jnp.float32))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32))
    self.dtype = dtype

  def __call__(self, x):
    return (x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
            + self.bias[...].astype(self.dtype))


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(self, features: int, *, eps: float = 1e-5, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


def dropout(x, rate: float, key):
  """Inverted dropout; identity when ``key`` is None or ``rate`` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def split_key(key, n: int):
  return [None] * n if key is None else list(jax.random.split(key, n))


def inverse_sigmoid(x, eps: float = 1e-5):
  """``log(x / (1 - x))`` with ``x`` clipped to [0, 1] and both terms to >= ``eps``
  (published)."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


def sine_position_embedding(height: int, width: int, channels: int, *,
                            temperature: float = 10000.0) -> jax.Array:
  """``[H·W, channels]`` sine embedding of a map without padding (published
  ``PositionEmbeddingSine(normalize=True)``: y then x, each ``channels / 2`` features
  interleaving sin and cos of ``(i + 0.5) / size · 2π / T^(2⌊k/2⌋ / (channels/2))``)."""
  feats = channels // 2
  dim_t = temperature ** (2 * (jnp.arange(feats) // 2) / feats)
  scale = 2 * math.pi
  y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / (height + 1e-6) * scale
  x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / (width + 1e-6) * scale

  def embed(v):
    v = v[:, None] / dim_t
    return jnp.stack([jnp.sin(v[:, 0::2]), jnp.cos(v[:, 1::2])], axis=2).reshape(v.shape[0], -1)

  ey, ex = embed(y), embed(x)
  pos = jnp.concatenate([jnp.broadcast_to(ey[:, None], (height, width, feats)),
                         jnp.broadcast_to(ex[None, :], (height, width, feats))], axis=-1)
  return pos.reshape(height * width, channels)


def box_position_embedding(boxes, channels: int, *, temperature: float = 10000.0):
  """``[..., 2·channels]`` sine embedding of ``[..., 4]`` boxes in [0, 1] (published
  ``get_proposal_pos_embed``: ``channels / 2`` features per coordinate)."""
  feats = channels // 2
  dim_t = temperature ** (2 * (jnp.arange(feats) // 2) / feats)
  v = boxes.astype(jnp.float32)[..., None] * (2 * math.pi) / dim_t
  emb = jnp.stack([jnp.sin(v[..., 0::2]), jnp.cos(v[..., 1::2])], axis=-1)
  return emb.reshape(boxes.shape[:-1] + (4 * feats,))


def _sampling_offset_bias(key, shape, dtype=jnp.float32):
  """Published init: head ``h`` samples along direction ``2πh / heads``, point ``p`` at
  ``p + 1`` times the unit step (max-norm), on every level."""
  del key
  heads, levels, points = shape
  theta = jnp.arange(heads, dtype=jnp.float32) * (2 * math.pi / heads)
  grid = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
  grid = grid / jnp.max(jnp.abs(grid), axis=-1, keepdims=True)
  grid = jnp.broadcast_to(grid[:, None, None, :], (heads, levels, points, 2))
  grid = grid * jnp.arange(1, points + 1, dtype=jnp.float32)[None, None, :, None]
  return grid.reshape(-1).astype(dtype)


class DeformableAttention(nnx.Module):
  """Multi-scale deformable attention (published ``MSDeformAttn``).

  Reference points ``[B, Q, L, 2]`` (x, y in [0, 1]) sample around the point with offsets in
  pixels of each level; ``[B, Q, L, 4]`` reference boxes (cx, cy, w, h) sample within the
  box (offsets scaled by half the box size over the number of points).
  """

  def __init__(self, channels: int, *, levels: int, heads: int, points: int, spatial_shapes,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.levels, self.heads, self.points = levels, heads, points
    self.spatial_shapes = tuple(tuple(s) for s in spatial_shapes)
    self.sampling_offsets = Linear(
        channels, heads * levels * points * 2, kernel_init=zeros, dtype=dtype,
        bias_init=lambda k, s, d=jnp.float32: _sampling_offset_bias(k, (heads, levels, points), d),
        rngs=rngs)
    self.attention_weights = Linear(channels, heads * levels * points, kernel_init=zeros,
                                    dtype=dtype, rngs=rngs)
    self.value_proj = Linear(channels, channels, dtype=dtype, rngs=rngs)
    self.output_proj = Linear(channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, query, reference_points, value):
    b, q, c = query.shape
    h, lv, p = self.heads, self.levels, self.points
    v = self.value_proj(value).reshape(b, value.shape[1], h, c // h)
    offsets = self.sampling_offsets(query).astype(jnp.float32).reshape(b, q, h, lv, p, 2)
    weights = self.attention_weights(query).astype(jnp.float32).reshape(b, q, h, lv * p)
    weights = jax.nn.softmax(weights, axis=-1).reshape(b, q, h, lv, p)
    ref = reference_points.astype(jnp.float32)
    if ref.shape[-1] == 2:
      normalizer = jnp.asarray([(w, hh) for hh, w in self.spatial_shapes], jnp.float32)
      locations = (ref[:, :, None, :, None, :]
                   + offsets / normalizer[None, None, None, :, None, :])
    else:
      locations = (ref[:, :, None, :, None, :2]
                   + offsets / p * ref[:, :, None, :, None, 2:] * 0.5)
    out = ops.multi_scale_deformable_attention(v, self.spatial_shapes, locations,
                                               weights.astype(v.dtype))
    return self.output_proj(out)


class FeedForward(nnx.Module):
  def __init__(self, channels: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.linear1 = Linear(channels, hidden, dtype=dtype, rngs=rngs)
    self.linear2 = Linear(hidden, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x, rate, keys):
    return dropout(self.linear2(dropout(jax.nn.relu(self.linear1(x)), rate, keys[0])), rate,
                   keys[1])


class EncoderLayer(nnx.Module):
  """``x = LN(x + DeformAttn(x + pos)); x = LN(x + FFN(x))``."""

  def __init__(self, channels: int, *, ffn_dim: int, dropout_rate: float, dtype, rngs,
               **attention):
    self.self_attn = DeformableAttention(channels, dtype=dtype, rngs=rngs, **attention)
    self.norm1 = LayerNorm(channels, dtype=dtype)
    self.ffn = FeedForward(channels, ffn_dim, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(channels, dtype=dtype)
    self.dropout_rate = dropout_rate

  def __call__(self, src, pos, reference_points, key=None):
    keys = split_key(key, 3)
    src = self.norm1(src + dropout(self.self_attn(src + pos, reference_points, src),
                                   self.dropout_rate, keys[0]))
    return self.norm2(src + self.ffn(src, self.dropout_rate, keys[1:]))


class MultiHeadAttention(nnx.Module):
  """``torch.nn.MultiheadAttention`` (separate q/k/v projections, softmax in float32)."""

  def __init__(self, channels: int, heads: int, *, dtype, rngs: nnx.Rngs):
    self.heads = heads
    self.query = Linear(channels, channels, dtype=dtype, rngs=rngs)
    self.key = Linear(channels, channels, dtype=dtype, rngs=rngs)
    self.value = Linear(channels, channels, dtype=dtype, rngs=rngs)
    self.out = Linear(channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, q, k, v, rate: float = 0.0, key=None):
    b, n, c = q.shape
    h = self.heads

    def split(x):
      return x.reshape(b, -1, h, c // h)

    qh, kh, vh = split(self.query(q)), split(self.key(k)), split(self.value(v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh).astype(jnp.float32) / math.sqrt(c // h)
    attn = dropout(jax.nn.softmax(logits, axis=-1), rate, key).astype(vh.dtype)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", attn, vh).reshape(b, n, c))


class DecoderLayer(nnx.Module):
  """``t = LN(t + SelfAttn(t + pos, t + pos, t)); t = LN(t + DeformAttn(t + pos, ref, memory));
  t = LN(t + FFN(t))``."""

  def __init__(self, channels: int, *, heads: int, ffn_dim: int, dropout_rate: float, dtype,
               rngs, **attention):
    self.self_attn = MultiHeadAttention(channels, heads, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(channels, dtype=dtype)
    self.cross_attn = DeformableAttention(channels, heads=heads, dtype=dtype, rngs=rngs,
                                          **attention)
    self.norm1 = LayerNorm(channels, dtype=dtype)
    self.ffn = FeedForward(channels, ffn_dim, dtype=dtype, rngs=rngs)
    self.norm3 = LayerNorm(channels, dtype=dtype)
    self.dropout_rate = dropout_rate

  def __call__(self, tgt, query_pos, reference_points, memory, key=None):
    keys = split_key(key, 5)
    rate = self.dropout_rate
    q = tgt + query_pos
    tgt = self.norm2(tgt + dropout(self.self_attn(q, q, tgt, rate, keys[4]), rate, keys[0]))
    tgt = self.norm1(tgt + dropout(self.cross_attn(tgt + query_pos, reference_points, memory),
                                   rate, keys[1]))
    return self.norm3(tgt + self.ffn(tgt, rate, keys[2:4]))


class MLP(nnx.Module):
  """``num_layers`` linear layers with ReLU between them (published box head: 3 layers)."""

  def __init__(self, in_features: int, hidden: int, out_features: int, num_layers: int, *,
               dtype, rngs: nnx.Rngs, last_bias=zeros):
    sizes = [in_features] + [hidden] * (num_layers - 1) + [out_features]
    layers = [Linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(sizes[:-2], sizes[1:-1])]
    layers.append(Linear(sizes[-2], sizes[-1], kernel_init=zeros, bias_init=last_bias,
                         dtype=dtype, rngs=rngs))
    self.layers = nnx.List(layers)

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i + 1 < len(self.layers):
        x = jax.nn.relu(x)
    return x
