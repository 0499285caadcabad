"""Loading torchvision ResNet state dicts (written here as .npz with random weights)."""

import importlib.util

import numpy as np
import pytest
from flax import nnx

from jaxrank import models
from jaxrank.models import dense, pretrained


def torchvision_resnet_shapes(depth):
  """Key -> shape of torchvision's ``resnet{depth}().state_dict()`` (written independently of
  the loader)."""
  blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
  bottleneck = depth >= 50
  shapes = {"conv1.weight": (64, 3, 7, 7)}

  def bn(prefix, c):
    shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,),
                   f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
                   f"{prefix}.num_batches_tracked": ()})

  bn("bn1", 64)
  in_c = 64
  for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
    out_c = width * (4 if bottleneck else 1)
    for i in range(count):
      p = f"layer{stage}.{i}"
      if bottleneck:
        convs = [(width, in_c, 1, 1), (width, width, 3, 3), (out_c, width, 1, 1)]
      else:
        convs = [(width, in_c, 3, 3), (width, width, 3, 3)]
      for j, shape in enumerate(convs, start=1):
        shapes[f"{p}.conv{j}.weight"] = shape
        bn(f"{p}.bn{j}", shape[0])
      if i == 0 and (stage > 1 or in_c != out_c):
        shapes[f"{p}.downsample.0.weight"] = (out_c, in_c, 1, 1)
        bn(f"{p}.downsample.1", out_c)
      in_c = out_c
  shapes["fc.weight"] = (1000, in_c)
  shapes["fc.bias"] = (1000,)
  return shapes


def random_state(depth, seed=0):
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in torchvision_resnet_shapes(depth).items():
    if key.endswith("num_batches_tracked"):
      state[key] = np.array(7, np.int64)
    elif key.endswith("running_var"):
      state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      state[key] = rng.normal(size=shape).astype(np.float32)
  return state


def tiny_head_config(**overrides):
  config = dense.default_model_config()
  config.update(backbone="resnet18", image_size=64, num_classes=3, fpn_channels=8,
                head_channels=8, head_convs=1)
  config.update(overrides)
  return config


def test_npz_round_trip_through_build_detector(tmp_path):
  state = random_state(18)
  path = tmp_path / "resnet18.npz"
  np.savez(path, **state)
  detector = dense.build_detector(tiny_head_config(pretrained=str(path)), rngs=nnx.Rngs(0))
  bb = detector.backbone
  np.testing.assert_array_equal(bb.conv1.kernel[...], state["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(bb.bn1.mean[...], state["bn1.running_mean"])
  np.testing.assert_array_equal(bb.bn1.var[...], state["bn1.running_var"])
  np.testing.assert_array_equal(bb.bn1.scale[...], state["bn1.weight"])
  block = bb.layer3[1]
  np.testing.assert_array_equal(block.conv2.kernel[...],
                                state["layer3.1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(block.bn2.bias[...], state["layer3.1.bn2.bias"])
  ds = bb.layer2[0].downsample
  np.testing.assert_array_equal(ds.conv.kernel[...],
                                state["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(ds.norm.mean[...], state["layer2.0.downsample.1.running_mean"])
  # Loaded weights keep their trainability: frozen stem, trainable layer2.
  assert isinstance(bb.conv1.kernel, models.Frozen)
  assert isinstance(bb.layer2[0].conv1.kernel, nnx.Param)
  assert isinstance(bb.layer2[0].bn1.mean, models.Frozen)


def test_bottleneck_names():
  state = random_state(50, seed=1)
  net = models.ResNet("resnet50", rngs=nnx.Rngs(0))
  pretrained.load_resnet_state_dict(net, state)
  np.testing.assert_array_equal(net.layer4[2].conv3.kernel[...],
                                state["layer4.2.conv3.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(net.layer1[0].downsample.norm.var[...],
                                state["layer1.0.downsample.1.running_var"])


def test_missing_unexpected_and_mismatched_keys(tmp_path):
  net = models.ResNet("resnet18", rngs=nnx.Rngs(0))
  before = np.array(net.conv1.kernel[...])
  state = random_state(18)
  del state["layer1.0.bn2.running_mean"]
  state["layer5.0.conv1.weight"] = np.zeros((3, 3, 3, 3), np.float32)
  state["layer2.1.conv1.weight"] = np.zeros((128, 128, 1, 1), np.float32)
  path = tmp_path / "bad.npz"
  np.savez(path, **state)
  with pytest.raises(ValueError) as info:
    pretrained.load_torchvision_resnet(net, path)
  message = str(info.value)
  assert "missing keys (1): ['layer1.0.bn2.running_mean']" in message
  assert "unexpected keys (1): ['layer5.0.conv1.weight']" in message
  assert "layer2.1.conv1.weight" in message and "shape mismatches (1)" in message
  np.testing.assert_array_equal(net.conv1.kernel[...], before)  # nothing copied


def test_wrong_backbones_and_files(tmp_path):
  with pytest.raises(ValueError, match="frozen_bn"):
    pretrained.load_resnet_state_dict(models.ResNet("resnet18", norm="group_norm",
                                                    rngs=nnx.Rngs(0)), random_state(18))
  with pytest.raises(ValueError, match="ResNet"):
    pretrained.load_torchvision_resnet(models.TinyBackbone(rngs=nnx.Rngs(0)), tmp_path / "x.npz")
  with pytest.raises(FileNotFoundError):
    pretrained.read_state_dict(tmp_path / "missing.npz")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_pth_without_torch_is_a_clear_import_error(tmp_path):
  path = tmp_path / "resnet18.pth"
  path.write_bytes(b"not really a checkpoint")
  with pytest.raises(ImportError, match="PyTorch"):
    pretrained.read_state_dict(path)
