"""Feature pyramid (Lin et al., CVPR 2017) from ``(C3, C4, C5)`` to ``P3 .. P{max_level}``.

As mmdet's ``FPN``: 1x1 laterals, nearest top-down upsampling, 3x3 output convolutions,
and extra levels by stride-2 3x3 convolutions, the first on C5 (``extra_from='input'``,
RetinaNet) or on P5 (``'output'``, ATSS), the next on the previous extra level.
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
  """Returns a tuple of ``max_level - 2`` maps with ``channels`` features each."""

  def __init__(self, in_channels, channels: int = 256, *, max_level: int = 7,
               extra_from: str = "input", dtype=jnp.float32, rngs: nnx.Rngs):
    if extra_from not in ("input", "output"):
      raise ValueError(f"extra_from must be 'input' or 'output', got {extra_from!r}")
    if max_level < 5:
      raise ValueError(f"max_level must be >= 5, got {max_level}")
    kw = dict(dtype=dtype, kernel_init=xavier_uniform, rngs=rngs)
    self.lateral = nnx.List([Conv(c, channels, 1, **kw) for c in in_channels])
    self.output = nnx.List([Conv(channels, channels, 3, **kw) for _ in in_channels])
    extra = []
    for i in range(max_level - 5):
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
    return tuple(outs)
