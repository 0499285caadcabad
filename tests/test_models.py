"""Detector architecture: shapes, anchors, jit, determinism, dtypes, frozen weights, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrank import models, ops
from jaxrank.models import dense, layers


def tiny_config(name="retinanet", **overrides):
  config = dense.default_model_config(name)
  config.update(backbone="tiny", image_size=64, num_classes=3, fpn_channels=16, head_channels=16,
                head_convs=2, frozen_stages=-1)
  config.update(overrides)
  return config


def abstract_outputs(config, batch=2):
  """Output shapes without initialising or compiling the network."""
  detector = nnx.eval_shape(lambda: dense.build_detector(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(detector)
  images = jax.ShapeDtypeStruct((batch, config.image_size, config.image_size, 3), jnp.float32)
  return detector, jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)


@pytest.mark.parametrize("backbone", ["tiny", "resnet18", "resnet34", "resnet50", "resnet101"])
@pytest.mark.parametrize("name", ["retinanet", "atss"])
def test_output_shapes_match_anchors(backbone, name):
  config = dense.default_model_config(name)
  config.update(backbone=backbone, image_size=96, num_classes=5)
  detector, out = abstract_outputs(config)
  num_anchors = detector.anchors.shape[0]
  assert out.class_logits.shape == (2, num_anchors, 5)
  assert out.box_deltas.shape == (2, num_anchors, 4)
  assert out.class_logits.dtype == jnp.float32 and out.box_deltas.dtype == jnp.float32
  assert sum(detector.num_anchors_per_level) == num_anchors
  expected = ops.generate_anchors(96, ratios=config.anchor_ratios,
                                  octave_base_scale=config.octave_base_scale,
                                  scales_per_octave=config.scales_per_octave)[0]
  np.testing.assert_array_equal(detector.anchors, expected)


@pytest.mark.parametrize("image_size", [64, 100, 129])
def test_odd_image_sizes(image_size):
  config = tiny_config(image_size=image_size)
  detector, out = abstract_outputs(config, batch=1)
  assert out.class_logits.shape[1] == detector.anchors.shape[0]


def test_resnet_channels_and_strides():
  for depth, channels in [("resnet18", (128, 256, 512)), ("resnet50", (512, 1024, 2048))]:
    net = nnx.eval_shape(lambda d=depth: models.ResNet(d, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(net)
    feats = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 64, 64, 3))), state)  # noqa: B023
    assert tuple(f.shape for f in feats) == tuple(
        (1, 64 // s, 64 // s, c) for s, c in zip((8, 16, 32), channels))


def test_resnet18_forward_numbers():
  config = tiny_config(backbone="resnet18")
  detector = dense.build_detector(config, rngs=nnx.Rngs(0))
  out = nnx.jit(lambda m, x: m(x))(detector, jnp.ones((1, 64, 64, 3)))
  assert np.all(np.isfinite(out.class_logits)) and np.all(np.isfinite(out.box_deltas))
  np.testing.assert_allclose(jax.nn.sigmoid(out.class_logits).mean(), 0.01, rtol=0.2)


def test_jit_forward_backward_and_sgd_step_keeps_frozen_weights():
  config = tiny_config("atss", head_convs=1, frozen_stages=2)
  detector = dense.build_detector(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(detector, nnx.Param, ...)
  before = jax.tree.map(np.array, rest)
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  tx = optax.sgd(0.1)

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      out = nnx.merge(graphdef, p, rest)(images)
      return jnp.mean(out.class_logits ** 2) + jnp.mean(out.box_deltas ** 2)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return value, grads, optax.apply_updates(params, updates)

  value, grads, new_params = step(params, tx.init(params))
  assert np.isfinite(value)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["backbone"]))
  assert float(jnp.abs(grads["head"]["scales"][...]).max()) > 0
  model = nnx.merge(graphdef, new_params, rest)
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.array, nnx.state(model, models.Frozen)))
  variables = _variables(model.backbone)
  assert isinstance(variables[("stem", "conv", "kernel")], models.Frozen)
  assert isinstance(variables[("stages", "1", "0", "conv", "kernel")], models.Frozen)
  assert isinstance(variables[("stages", "2", "0", "conv", "kernel")], nnx.Param)
  assert not np.allclose(variables[("stages", "2", "0", "conv", "kernel")][...],
                         detector.backbone.stages[2][0].conv.kernel[...])


def test_determinism_and_prior_probability():
  images = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
  forward = nnx.jit(lambda m, x: m(x))
  outs = [forward(dense.build_detector(tiny_config(), rngs=nnx.Rngs(seed)), images)
          for seed in (0, 0, 1)]
  np.testing.assert_allclose(jax.nn.sigmoid(outs[0].class_logits).mean(), 0.01, rtol=0.2)
  np.testing.assert_array_equal(outs[0].class_logits, outs[1].class_logits)
  np.testing.assert_array_equal(outs[0].box_deltas, outs[1].box_deltas)
  assert not np.allclose(outs[0].box_deltas, outs[2].box_deltas)


def test_bfloat16_activations_float32_params_and_losses():
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  f32 = dense.build_detector(tiny_config("atss", head_convs=1), rngs=nnx.Rngs(0))
  bf16 = dense.build_detector(tiny_config("atss", head_convs=1, dtype="bfloat16"),
                               rngs=nnx.Rngs(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16)))
  graphdef, state = nnx.split(bf16.backbone)
  features = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(images.astype(jnp.bfloat16)), state)
  assert all(f.dtype == jnp.bfloat16 for f in features)

  static = bf16.static_info()
  batch = {"boxes": np.array([[[4, 4, 40, 40]]], np.float32).repeat(2, 0),
           "labels": np.zeros((2, 1), np.int32), "box_mask": np.ones((2, 1), bool)}
  loss_config = dense.default_loss_config("focal_giou")
  graphdef, params, rest = nnx.split(bf16, nnx.Param, ...)

  @jax.jit
  def step(params):
    def f(p):
      out = nnx.merge(graphdef, p, rest)(images)
      loss, aux = dense.detection_loss(static, out, batch, loss_config, {})
      return loss, (aux, out)
    return jax.value_and_grad(f, has_aux=True)(params)

  (loss, (_, out16)), grads = step(params)
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert out16.class_logits.dtype == jnp.float32 and out16.box_deltas.dtype == jnp.float32
  out32 = nnx.jit(lambda m, x: m(x))(f32, images)
  np.testing.assert_allclose(out16.class_logits, out32.class_logits, atol=0.1)
  np.testing.assert_allclose(out16.box_deltas, out32.box_deltas, atol=0.1)


def _variables(module):
  return {tuple(str(p) for p in path): v for path, v in nnx.iter_graph(module)
          if isinstance(v, nnx.Variable)}


@pytest.mark.parametrize("norm", ["frozen_bn", "group_norm"])
def test_frozen_weights_are_not_params(norm):
  config = tiny_config(backbone="resnet18", norm=norm, frozen_stages=1)
  detector = nnx.eval_shape(lambda: dense.build_detector(config, rngs=nnx.Rngs(0)))
  variables = _variables(detector.backbone)
  for path, var in variables.items():
    frozen_part = path[0] in ("conv1", "bn1", "layer1")
    is_norm = any(p.startswith("bn") or p == "norm" for p in path)
    if frozen_part or (norm == "frozen_bn" and is_norm):
      assert isinstance(var, models.Frozen) and not isinstance(var, nnx.Param), path
    else:
      assert isinstance(var, nnx.Param), path
  assert all(isinstance(v, nnx.Param) for v in _variables(detector.head).values())
  _, params, rest = nnx.split(detector, nnx.Param, ...)
  assert set(type(v) for v in jax.tree.leaves(rest, is_leaf=lambda x: isinstance(x, nnx.Variable))
             ) <= {models.Frozen}
  assert "layer1" not in params["backbone"] and "layer2" in params["backbone"]


def test_frozen_batchnorm_uses_stored_statistics():
  bn = layers.FrozenBatchNorm(3)
  bn.scale[...] = jnp.array([1.0, 2.0, 3.0])
  bn.bias[...] = jnp.array([0.0, 1.0, -1.0])
  bn.mean[...] = jnp.array([1.0, 0.0, 2.0])
  bn.var[...] = jnp.array([4.0, 1.0, 0.25])
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  expected = (x - bn.mean[...]) / jnp.sqrt(bn.var[...] + 1e-5) * bn.scale[...] + bn.bias[...]
  np.testing.assert_allclose(bn(x), expected, rtol=1e-5, atol=1e-5)


def test_detect_and_decode():
  detector = dense.build_detector(tiny_config(), rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  dets = nnx.jit(lambda m, x: m.detect(x, max_detections=7, score_threshold=0.0))(detector, images)
  assert dets.boxes.shape == (2, 7, 4) and dets.scores.shape == (2, 7)
  assert dets.classes.shape == (2, 7) and dets.valid.shape == (2, 7)
  assert np.all(dets.boxes >= 0) and np.all(dets.boxes <= 64)
  deltas = jnp.zeros((2, detector.anchors.shape[0], 4))
  np.testing.assert_allclose(detector.decode(deltas)[0], detector.anchors, atol=1e-4)
  with pytest.raises(ValueError, match="images must be"):
    detector(jnp.zeros((1, 32, 32, 3)))


def test_static_info_is_hashable_and_leafless():
  detector = nnx.eval_shape(lambda: dense.build_detector(tiny_config(), rngs=nnx.Rngs(0)))
  static = detector.static_info()
  assert hash(static) == hash(detector.static_info())
  assert jax.tree.leaves(static) == []
  assert static.anchors.shape == detector.anchors.shape
  assert jax.jit(lambda s, x: x + s.num_classes)(static, 1) == 4


@pytest.mark.parametrize("field,value", [
    ("name", "fcos"), ("backbone", "resnet152"), ("norm", "batch_norm"), ("frozen_stages", 5),
    ("dtype", "float16"), ("image_size", 0), ("num_classes", 0), ("min_level", 2),
    ("max_level", 8), ("prior_prob", 1.5), ("anchor_ratios", ()), ("box_stds", (0.1, 0.1)),
    ("scales_per_octave", 0), ("head_convs", -1), ("pretrained", None),
])
def test_invalid_model_config(field, value):
  config = tiny_config()
  with config.unlocked():
    config[field] = value
  with pytest.raises(ValueError, match=field):
    dense.build_detector(config, rngs=nnx.Rngs(0))


def test_unknown_model_config_field():
  config = tiny_config()
  config.num_clases = 3
  with pytest.raises(ValueError, match="num_clases"):
    dense.build_detector(config, rngs=nnx.Rngs(0))
  config = tiny_config(pretrained="weights.npz")
  with pytest.raises(ValueError, match="pretrained"):
    dense.build_detector(config, rngs=nnx.Rngs(0))
