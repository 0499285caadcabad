"""Building blocks: convolutions and normalisations whose weights can be frozen.

A frozen weight is stored as :class:`Frozen`, not ``nnx.Param``, so that
``nnx.split(model, nnx.Param, ...)`` yields exactly the trainable parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ("frozen_bn", "group_norm")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Frozen(nnx.Variable):
  """A weight that is never trained (frozen BatchNorm, frozen backbone stages)."""


def variable(value, trainable: bool):
  return nnx.Param(value) if trainable else Frozen(value)


def group_count(channels: int, groups: int = 32) -> int:
  """GroupNorm groups: ``groups`` when it divides ``channels``, else their gcd."""
  return math.gcd(int(channels), int(groups))


_CHUNK = 1 << 16


def _chunked(sampler, key, shape):
  """``sampler`` values of ``shape`` drawn in fixed-size chunks, so that eager initialisation
  compiles the random-bit generator once instead of once per weight shape."""
  n = math.prod(shape)
  chunks = [sampler(jax.random.fold_in(key, i), (_CHUNK,)) for i in range(max(1, -(-n // _CHUNK)))]
  flat = chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)
  return flat[:n].reshape(shape)


def _fans(shape):
  receptive = math.prod(shape[:-2])
  return receptive * shape[-2], receptive * shape[-1]


def normal_init(std: float):
  """``N(0, std²)`` initialiser."""
  def init(key, shape, dtype=jnp.float32):
    return (_chunked(jax.random.normal, key, shape) * std).astype(dtype)
  return init


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
  """He initialisation with ``fan_out`` (torchvision's ResNet convolutions)."""
  return normal_init(math.sqrt(2.0 / _fans(shape)[1]))(key, shape, dtype)


def xavier_uniform(key, shape, dtype=jnp.float32):
  """Glorot uniform (mmdet's FPN convolutions)."""
  fan_in, fan_out = _fans(shape)
  limit = math.sqrt(6.0 / (fan_in + fan_out))
  values = _chunked(jax.random.uniform, key, shape)
  return ((2.0 * values - 1.0) * limit).astype(dtype)


class Conv(nnx.Module):
  """2-D convolution, NHWC/HWIO, with torch-style symmetric padding ``kernel_size // 2``."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
               use_bias: bool = True, trainable: bool = True, dtype=jnp.float32,
               kernel_init=kaiming_normal_fan_out, bias_init=nnx.initializers.zeros,
               rngs: nnx.Rngs):
    shape = (kernel_size, kernel_size, in_features, out_features)
    self.kernel = variable(kernel_init(rngs.params(), shape, jnp.float32), trainable)
    self.bias = variable(bias_init(rngs.params(), (out_features,), jnp.float32),
                         trainable) if use_bias else None
    self.stride = int(stride)
    self.padding = int(kernel_size) // 2
    self.dtype = dtype

  def __call__(self, x):
    x = x.astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...].astype(self.dtype), (self.stride, self.stride),
        [(self.padding, self.padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class FrozenBatchNorm(nnx.Module):
  """BatchNorm in inference mode with every statistic and affine weight frozen."""

  def __init__(self, num_features: int, *, eps: float = 1e-5, dtype=jnp.float32):
    self.scale = Frozen(jnp.ones((num_features,), jnp.float32))
    self.bias = Frozen(jnp.zeros((num_features,), jnp.float32))
    self.mean = Frozen(jnp.zeros((num_features,), jnp.float32))
    self.var = Frozen(jnp.ones((num_features,), jnp.float32))
    self.eps = float(eps)
    self.dtype = dtype

  def __call__(self, x):
    mul = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
    add = self.bias[...] - self.mean[...] * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over NHWC features, statistics in float32."""

  def __init__(self, num_features: int, *, groups: int = 32, eps: float = 1e-5,
               trainable: bool = True, dtype=jnp.float32):
    self.scale = variable(jnp.ones((num_features,), jnp.float32), trainable)
    self.bias = variable(jnp.zeros((num_features,), jnp.float32), trainable)
    self.groups = group_count(num_features, groups)
    self.eps = float(eps)
    self.dtype = dtype

  def __call__(self, x):
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + self.eps)
    y = g.reshape(b, h, w, c) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


def norm_layer(kind: str, num_features: int, *, trainable: bool = True, dtype=jnp.float32):
  """``'frozen_bn'`` (always frozen) or ``'group_norm'`` (32 groups)."""
  if kind == "frozen_bn":
    return FrozenBatchNorm(num_features, dtype=dtype)
  if kind == "group_norm":
    return GroupNorm(num_features, trainable=trainable, dtype=dtype)
  raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def max_pool_3x3_s2(x):
  """``nn.MaxPool2d(3, stride=2, padding=1)``."""
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
