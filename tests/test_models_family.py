"""The detector interface: a family added in a few lines trains through the trainer."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax import numpy as jnp

from jaxrank import models, ops
from jaxrank.train import config as config_lib
from jaxrank.train import trainer

from test_train_helpers import jax_cache, load_state, tiny_config  # noqa: F401


class CentreBoxDetector(nnx.Module):
  """Predicts one box per image from mean pooled pixels; the loss uses the ground truth."""

  def __init__(self, model_config, loss_config, *, rngs):
    del loss_config
    self.image_size = model_config.image_size
    self.num_classes = model_config.num_classes
    self.linear = nnx.Linear(3, 4 + model_config.num_classes, rngs=rngs)

  def _predict(self, images):
    out = self.linear(jnp.mean(images, axis=(1, 2)))
    x1, y1, x2, y2 = jnp.moveaxis(jnp.abs(out[:, :4]) * self.image_size, -1, 0)
    boxes = jnp.stack([jnp.minimum(x1, x2), jnp.minimum(y1, y2), jnp.maximum(x1, x2),
                       jnp.maximum(y1, y2)], -1)
    return boxes, out[:, 4:]

  def loss(self, batch, loss_state):
    boxes, logits = self._predict(batch["image"])
    target = jnp.where(batch["box_mask"][:, :1], batch["boxes"][:, 0], 0.0)
    loss = jnp.mean(jnp.abs(boxes - target)) + jnp.mean(logits ** 2)
    return loss, {"box_l1": loss}, {"seen": loss_state["seen"] + 1}

  def detect(self, images, *, score_threshold, max_detections, iou_threshold, pre_nms_top_k):
    del score_threshold, iou_threshold, pre_nms_top_k
    boxes, logits = self._predict(images)
    b = images.shape[0]
    pad = max_detections - 1
    return ops.Detections(
        boxes=jnp.concatenate([boxes[:, None], jnp.zeros((b, pad, 4))], 1),
        scores=jnp.concatenate([jnp.max(jnp.abs(logits), -1, keepdims=True),
                                jnp.zeros((b, pad))], 1),
        classes=jnp.zeros((b, max_detections), jnp.int32),
        valid=jnp.arange(max_detections)[None].repeat(b, 0) == 0)


def _config(name):
  return ml_collections.ConfigDict({"name": name, "image_size": 64, "num_classes": 3})


TOY = models.DetectorFamily(
    name="toy",
    model_names=("centre_box",),
    default_model_config=_config,
    default_loss_config=lambda name: ml_collections.ConfigDict({"name": name}),
    check_config=lambda model_config, loss_config: None,
    build=CentreBoxDetector,
    init_loss_state=lambda model_config, loss_config: {"seen": jnp.zeros((), jnp.int32)},
)


@pytest.fixture
def toy_family():
  models.register_family(TOY)
  yield TOY
  models.unregister_family("toy")


def test_a_new_family_trains_through_the_trainer(tmp_path, toy_family, jax_cache):
  config = tiny_config(train__num_steps=2, train__checkpoint_every=0)
  with config.unlocked():
    config.model = toy_family.default_model_config("centre_box")
    config.model.image_size = config.data.get_ref("image_size")
    config.model.num_classes = config.data.get_ref("num_classes")
    config.loss = toy_family.default_loss_config("l1")
  config_lib.validate(config)
  result = trainer.train(config, str(tmp_path))
  assert result.step == 2 and "AP" in result.metrics
  saved = load_state(str(tmp_path), 2)
  assert int(np.asarray(saved["['loss_state']['seen']"])) == 2


def test_unknown_model_name_is_a_config_error():
  config = tiny_config()
  config.model.name = "yolo"
  with pytest.raises(config_lib.ConfigError, match="model.name"):
    config_lib.validate(config)


def test_a_model_name_belongs_to_one_family(toy_family):
  with pytest.raises(ValueError, match="already built by family 'dense'"):
    models.register_family(models.DetectorFamily(
        name="other", model_names=("retinanet",), default_model_config=_config,
        default_loss_config=_config, check_config=lambda m, loss: None, build=CentreBoxDetector))
