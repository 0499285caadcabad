"""Feature pyramid (Lin et al., CVPR 2017) from ``(C{min_level}, ..., C5)`` to
``P{min_level} .. P{max_level}``.

As mmdet's ``FPN``: 1x1 laterals, nearest top-down upsampling, 3x3 output convolutions,
and extra levels by stride-2 3x3 convolutions, the first on C5 (``extra_from='input'``,
RetinaNet) or on P5 (``'output'``, ATSS), the next on the previous extra level; or, with
``extra_from='pool'`` (Faster R-CNN's P6), by ``max_pool2d(kernel 1, stride 2)`` of the
previous level.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxrank.models.layers import Conv, xavier_uniform


def upsample_to(x, height: int, width: int):
  """Nearest 2x upsampling cropped to ``(height, width)`` (feature sizes are ``ceil(S / s)``)."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x[:, :height, :width]


class FPN(nnx.Module):
  """Returns a tuple of ``max_level - min_level + 1`` maps with ``channels`` features each
  (``in_channels``: the widths of ``C{min_level} .. C5``)."""

  def __init__(self, in_channels, channels: int = 256, *, max_level: int = 7,
               extra_from: str = "input", min_level: int = 3, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if extra_from not in ("input", "output", "pool"):
      raise ValueError(f"extra_from must be 'input', 'output' or 'pool', got {extra_from!r}")
    if max_level < 5:
      raise ValueError(f"max_level must be >= 5, got {max_level}")
    if min_level + len(in_channels) - 1 != 5:
      raise ValueError(f"in_channels must give C{min_level}-C5, got {len(in_channels)} widths")
    kw = dict(dtype=dtype, kernel_init=xavier_uniform, rngs=rngs)
    self.lateral = nnx.List([Conv(c, channels, 1, **kw) for c in in_channels])
    self.output = nnx.List([Conv(channels, channels, 3, **kw) for _ in in_channels])
    self.num_pooled = max_level - 5 if extra_from == "pool" else 0
    extra = []
    for i in range(max_level - 5 - self.num_pooled):
      source = in_channels[-1] if i == 0 and extra_from == "input" else channels
      extra.append(Conv(source, channels, 3, stride=2, **kw))
    self.extra = nnx.List(extra)
    self.extra_from = extra_from

  def __call__(self, features):
    laterals = [conv(f) for conv, f in zip(self.lateral, features)]
    for i in range(len(laterals) - 1, 0, -1):
      h, w = laterals[i - 1].shape[1:3]
      laterals[i - 1] = laterals[i - 1] + upsample_to(laterals[i], h, w)
    outs = [conv(x) for conv, x in zip(self.output, laterals)]
    for i, conv in enumerate(self.extra):
      source = features[-1] if i == 0 and self.extra_from == "input" else outs[-1]
      outs.append(conv(source))
    for _ in range(self.num_pooled):
      outs.append(outs[-1][:, ::2, ::2])
    return tuple(outs)
