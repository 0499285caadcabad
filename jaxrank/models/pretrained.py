"""ImageNet weights for :class:`jaxrank.models.resnet.ResNet` from torchvision state dicts.

Keys are torchvision's (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight``,
``layer1.0.downsample.0.weight``, ...). Convolution kernels go from OIHW to HWIO; BatchNorm
``weight``, ``bias``, ``running_mean`` and ``running_var`` go into the frozen BatchNorm.
``num_batches_tracked`` and the classifier ``fc.*`` are skipped.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from jaxrank.models.layers import Conv, FrozenBatchNorm
from jaxrank.models.resnet import ResNet

_SKIPPED = ("fc.weight", "fc.bias")
_BN_FIELDS = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _targets(backbone: ResNet):
  """``{torchvision key: (Variable, kind)}`` for every weight of ``backbone``."""
  out = {}

  def conv(prefix, module: Conv):
    out[f"{prefix}.weight"] = (module.kernel, "conv")

  def norm(prefix, module):
    if not isinstance(module, FrozenBatchNorm):
      raise ValueError("torchvision weights carry BatchNorm statistics: build the backbone with "
                       "norm='frozen_bn'")
    for key, attr in _BN_FIELDS.items():
      out[f"{prefix}.{key}"] = (getattr(module, attr), "bn")

  conv("conv1", backbone.conv1)
  norm("bn1", backbone.bn1)
  for stage in range(1, 5):
    for i, block in enumerate(getattr(backbone, f"layer{stage}")):
      prefix = f"layer{stage}.{i}"
      for j in (1, 2, 3):
        if hasattr(block, f"conv{j}"):
          conv(f"{prefix}.conv{j}", getattr(block, f"conv{j}"))
          norm(f"{prefix}.bn{j}", getattr(block, f"bn{j}"))
      if block.downsample is not None:
        conv(f"{prefix}.downsample.0", block.downsample.conv)
        norm(f"{prefix}.downsample.1", block.downsample.norm)
  return out


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A torchvision state dict as NumPy arrays, from ``.pth``/``.pt`` (needs torch) or ``.npz``."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no pretrained weights at {path!r}")
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  try:
    import torch  # noqa: PLC0415 - optional dependency
  except ImportError as e:
    raise ImportError(f"reading {path!r} needs PyTorch (pip install torch), or convert it to .npz "
                      "with the same key names") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "state_dict" in state:
    state = state["state_dict"]
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def load_resnet_state_dict(backbone: ResNet, state: dict) -> None:
  """Copies ``state`` into ``backbone`` in place; ``ValueError`` listing every missing or
  unexpected key and every shape mismatch (nothing is copied then)."""
  targets = _targets(backbone)
  keys = {k for k in state if not k.endswith("num_batches_tracked") and k not in _SKIPPED}
  missing = sorted(set(targets) - keys)
  unexpected = sorted(keys - set(targets))
  mismatched, values = [], {}
  for key in sorted(set(targets) & keys):
    variable, kind = targets[key]
    value = np.asarray(state[key], np.float32)
    if kind == "conv" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    if value.shape != variable[...].shape:
      mismatched.append(f"{key}: checkpoint {tuple(np.shape(state[key]))}, "
                        f"model {tuple(variable[...].shape)}{' (HWIO)' if kind == 'conv' else ''}")
    values[key] = value
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {missing}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
  if mismatched:
    problems.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
  if problems:
    raise ValueError(f"cannot load a torchvision {backbone.depth} state dict: "
                     + "; ".join(problems))
  for key, value in values.items():
    targets[key][0][...] = jnp.asarray(value)


def load_torchvision_resnet(detector_or_backbone, path) -> None:
  """Loads torchvision ResNet weights (``.pth`` or ``.npz``) into a detector's backbone or a
  :class:`ResNet`, in place."""
  backbone = getattr(detector_or_backbone, "backbone", detector_or_backbone)
  if not isinstance(backbone, ResNet):
    raise ValueError(f"torchvision weights need a ResNet backbone, got {type(backbone).__name__}")
  load_resnet_state_dict(backbone, read_state_dict(path))
