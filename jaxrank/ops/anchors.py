"""Dense anchors per FPN level, as mmdet's ``AnchorGenerator`` (centre offset 0).

A level of stride ``s`` has base anchors centred at ``(0, 0)`` with, for every ratio
``r = h / w`` (outer) and every scale ``k = octave_base_scale * 2 ** (i / scales_per_octave)``
(inner), ``w = s * k / sqrt(r)`` and ``h = s * k * sqrt(r)``; they are shifted to every
location ``(x * s, y * s)`` of a ``ceil(H / s) x ceil(W / s)`` feature map.

Everything is computed from Python ints with NumPy, so shapes are static and the results
are constants under ``jax.jit``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_STRIDES = (8, 16, 32, 64, 128)
DEFAULT_RATIOS = (0.5, 1.0, 2.0)


def _image_hw(image_size):
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  if len(image_size) != 2:
    raise ValueError(f"image_size must be an int or (h, w), got {image_size!r}.")
  return int(image_size[0]), int(image_size[1])


def feature_map_sizes(image_size, *, strides: Sequence[int] = DEFAULT_STRIDES):
  """``((ceil(H / s), ceil(W / s)) for s in strides)``."""
  h, w = _image_hw(image_size)
  return tuple((math.ceil(h / s), math.ceil(w / s)) for s in strides)


def num_anchors_per_location(*, ratios: Sequence[float] = DEFAULT_RATIOS,
                             scales_per_octave: int = 3) -> int:
  """``len(ratios) * scales_per_octave``."""
  return len(ratios) * int(scales_per_octave)


def num_anchors_per_level(image_size, *, strides: Sequence[int] = DEFAULT_STRIDES,
                          ratios: Sequence[float] = DEFAULT_RATIOS,
                          scales_per_octave: int = 3):
  """Static tuple of anchor counts per level (``fh * fw * anchors_per_location``)."""
  k = num_anchors_per_location(ratios=ratios, scales_per_octave=scales_per_octave)
  return tuple(fh * fw * k for fh, fw in feature_map_sizes(image_size, strides=strides))


def base_anchors(stride: int, *, ratios: Sequence[float] = DEFAULT_RATIOS,
                 octave_base_scale: float = 4.0, scales_per_octave: int = 3):
  """``[len(ratios) * scales_per_octave, 4]`` anchors of one level centred at ``(0, 0)``."""
  ratios = np.asarray(ratios, np.float64)
  if ratios.ndim != 1 or ratios.size == 0 or np.any(ratios <= 0):
    raise ValueError(f"ratios must be a non-empty sequence of positive floats, got {ratios}.")
  if int(scales_per_octave) < 1:
    raise ValueError(f"scales_per_octave must be >= 1, got {scales_per_octave}.")
  scales = octave_base_scale * 2.0 ** (np.arange(scales_per_octave) / scales_per_octave)
  h_ratios = np.sqrt(ratios)
  ws = (stride / h_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
  return np.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], axis=-1)


def generate_anchors(image_size, *, strides: Sequence[int] = DEFAULT_STRIDES,
                     ratios: Sequence[float] = DEFAULT_RATIOS,
                     octave_base_scale: float = 4.0, scales_per_octave: int = 3):
  """All anchors of an image of size ``(H, W)`` (or an int for square images).

  Returns:
    ``(anchors, level_index)``: NumPy ``float32 [A, 4]`` xyxy anchors and ``int32 [A]``
    level numbers, ordered level-major, then location (row-major ``y, x``), then anchor
    type (ratio-major, scale-minor), i.e. the order of a head output
    ``[fh, fw, anchors_per_location * ...]`` flattened and concatenated over levels.
  """
  sizes = feature_map_sizes(image_size, strides=strides)
  anchors, levels = [], []
  for level, (stride, (fh, fw)) in enumerate(zip(strides, sizes)):
    base = base_anchors(stride, ratios=ratios, octave_base_scale=octave_base_scale,
                        scales_per_octave=scales_per_octave)
    sy, sx = np.meshgrid(np.arange(fh) * float(stride), np.arange(fw) * float(stride),
                         indexing="ij")
    shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)
    level_anchors = (shifts + base[None]).reshape(-1, 4)
    anchors.append(level_anchors)
    levels.append(np.full(level_anchors.shape[0], level, np.int32))
  return (np.concatenate(anchors).astype(np.float32), np.concatenate(levels))
