"""Backbones returning ``(C3, C4, C5)`` (strides 8, 16, 32), NHWC.

:class:`ResNet` follows torchvision's ResNet v1.5 (stride on the 3x3 convolution of a
bottleneck) with attribute names matching torchvision's state-dict keys, so that
:func:`jaxrank.models.pretrained.load_torchvision_resnet` can copy ImageNet weights.
``frozen_stages`` follows mmdet: ``-1`` trains everything, ``0`` freezes the stem, ``k``
the stem and ``layer1..layerk``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrank.models.layers import DTYPES, NORMS, Conv, max_pool_3x3_s2, norm_layer

BACKBONES = ("tiny", "resnet18", "resnet34", "resnet50", "resnet101")
RESNET_SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


class Downsample(nnx.Module):
  """The projection shortcut (torchvision ``downsample.0`` conv, ``downsample.1`` norm)."""

  def __init__(self, in_features, out_features, stride, *, norm, trainable, dtype, rngs):
    self.conv = Conv(in_features, out_features, 1, stride=stride, use_bias=False,
                     trainable=trainable, dtype=dtype, rngs=rngs)
    self.norm = norm_layer(norm, out_features, trainable=trainable, dtype=dtype)

  def __call__(self, x):
    return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""
  expansion = 1

  def __init__(self, in_features, features, stride, *, norm, trainable, dtype, rngs):
    kw = dict(use_bias=False, trainable=trainable, dtype=dtype, rngs=rngs)
    self.conv1 = Conv(in_features, features, 3, stride=stride, **kw)
    self.bn1 = norm_layer(norm, features, trainable=trainable, dtype=dtype)
    self.conv2 = Conv(features, features, 3, **kw)
    self.bn2 = norm_layer(norm, features, trainable=trainable, dtype=dtype)
    self.downsample = (Downsample(in_features, features, stride, norm=norm, trainable=trainable,
                                  dtype=dtype, rngs=rngs)
                       if stride != 1 or in_features != features else None)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut.astype(y.dtype))


class Bottleneck(nnx.Module):
  """1x1 - 3x3 (strided) - 1x1 bottleneck (ResNet-50/101)."""
  expansion = 4

  def __init__(self, in_features, features, stride, *, norm, trainable, dtype, rngs):
    out = features * self.expansion
    kw = dict(use_bias=False, trainable=trainable, dtype=dtype, rngs=rngs)
    self.conv1 = Conv(in_features, features, 1, **kw)
    self.bn1 = norm_layer(norm, features, trainable=trainable, dtype=dtype)
    self.conv2 = Conv(features, features, 3, stride=stride, **kw)
    self.bn2 = norm_layer(norm, features, trainable=trainable, dtype=dtype)
    self.conv3 = Conv(features, out, 1, **kw)
    self.bn3 = norm_layer(norm, out, trainable=trainable, dtype=dtype)
    self.downsample = (Downsample(in_features, out, stride, norm=norm, trainable=trainable,
                                  dtype=dtype, rngs=rngs)
                       if stride != 1 or in_features != out else None)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut.astype(y.dtype))


class ResNet(nnx.Module):
  """ResNet-18/34/50/101 trunk without the classifier; returns ``(C{min_level}, ..., C5)``."""

  def __init__(self, depth: str = "resnet50", *, norm: str = "frozen_bn", frozen_stages: int = 1,
               min_level: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
    if depth not in RESNET_SPECS:
      raise ValueError(f"backbone must be one of {tuple(RESNET_SPECS)}, got {depth!r}")
    block_type, blocks = RESNET_SPECS[depth]
    block = BasicBlock if block_type == "basic" else Bottleneck
    self.depth = depth
    self.first_output = _first_output(min_level)
    self.norm_kind = norm
    self.frozen_stages = int(frozen_stages)
    stem_trainable = self.frozen_stages < 0
    self.conv1 = Conv(3, 64, 7, stride=2, use_bias=False, trainable=stem_trainable, dtype=dtype,
                      rngs=rngs)
    self.bn1 = norm_layer(norm, 64, trainable=stem_trainable, dtype=dtype)
    in_features = 64
    channels = []
    for stage, (count, features) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
      trainable = stage > self.frozen_stages
      layer = []
      for i in range(count):
        stride = 2 if stage > 1 and i == 0 else 1
        layer.append(block(in_features, features, stride, norm=norm, trainable=trainable,
                           dtype=dtype, rngs=rngs))
        in_features = features * block.expansion
      setattr(self, f"layer{stage}", nnx.List(layer))
      channels.append(in_features)
    self.out_channels = tuple(channels[self.first_output:])

  def __call__(self, x):
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = max_pool_3x3_s2(x)
    outs = []
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in layer:
        x = block(x)
      outs.append(x)
    return tuple(outs[self.first_output:])


def _first_output(min_level) -> int:
  if min_level not in (2, 3):
    raise ValueError(f"min_level must be 2 (C2-C5) or 3 (C3-C5), got {min_level!r}")
  return min_level - 2


class ConvNormReLU(nnx.Module):
  """3x3 convolution, normalisation, ReLU."""

  def __init__(self, in_features, out_features, stride, *, norm, trainable, dtype, rngs):
    self.conv = Conv(in_features, out_features, 3, stride=stride, use_bias=False,
                     trainable=trainable, dtype=dtype, rngs=rngs)
    self.norm = norm_layer(norm, out_features, trainable=trainable, dtype=dtype)

  def __call__(self, x):
    return jax.nn.relu(self.norm(self.conv(x)))


class TinyBackbone(nnx.Module):
  """Five strided 3x3 conv stages (a stem and four stages, strides 2..32): fast on CPU.

  Each stage after the stem adds one unstrided 3x3 convolution. Stage ``k`` of
  ``frozen_stages`` maps as for :class:`ResNet` (0 is the stem).
  """

  def __init__(self, *, width: int = 16, norm: str = "frozen_bn", frozen_stages: int = -1,
               min_level: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
    widths = (width, 2 * width, 4 * width, 8 * width, 16 * width)
    self.first_output = _first_output(min_level)
    self.frozen_stages = int(frozen_stages)
    kw = dict(norm=norm, dtype=dtype, rngs=rngs)
    self.stem = ConvNormReLU(3, widths[0], 2, trainable=self.frozen_stages < 0, **kw)
    stages = []
    for stage in range(1, 5):
      trainable = stage > self.frozen_stages
      stages.append(nnx.List([
          ConvNormReLU(widths[stage - 1], widths[stage], 2, trainable=trainable, **kw),
          ConvNormReLU(widths[stage], widths[stage], 1, trainable=trainable, **kw),
      ]))
    self.stages = nnx.List(stages)
    self.out_channels = widths[1 + self.first_output:]

  def __call__(self, x):
    x = self.stem(x)
    outs = []
    for stage in self.stages:
      for layer in stage:
        x = layer(x)
      outs.append(x)
    return tuple(outs[self.first_output:])


def backbone_input(images, dtype):
  """Normalised float ``[B, H, W, 3]`` images cast to the backbone's ``dtype``.

  Raises:
    TypeError: integer images (a loader batch's ``uint8`` pixels): normalise them first with
      :func:`jaxrank.data.normalize_images` (the trainer's steps do).
  """
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"detector images must be normalised floats, got {images.dtype}; "
                    "normalise loader batches with jaxrank.data.normalize_images first")
  return images.astype(dtype)


def build_backbone(name: str, *, norm: str = "frozen_bn", frozen_stages: int = -1,
                   min_level: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
  """A backbone by name (see :data:`BACKBONES`) returning ``C{min_level}-C5`` (``min_level``
  2 or 3); ``.out_channels`` gives their widths."""
  kw = dict(norm=norm, frozen_stages=frozen_stages, min_level=min_level, dtype=dtype, rngs=rngs)
  if name == "tiny":
    return TinyBackbone(**kw)
  if name in RESNET_SPECS:
    return ResNet(name, **kw)
  raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")


def check_backbone_config(model) -> str:
  """Checks the backbone fields every family's model config has (``backbone``, ``norm``,
  ``dtype``, ``frozen_stages``, ``pretrained``) in the ``model`` section (a
  :class:`jaxrank.validation.Section`); returns the backbone name."""
  backbone = model.choice("backbone", BACKBONES)
  model.choice("norm", NORMS)
  model.choice("dtype", tuple(DTYPES))
  model.integer("frozen_stages", min=-1, max=4)
  if model.string("pretrained") and backbone not in RESNET_SPECS:
    raise model.error("pretrained", f"needs a ResNet backbone, got {backbone!r}")
  return backbone
