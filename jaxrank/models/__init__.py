"""Flax NNX detectors behind one interface (:mod:`jaxrank.models.family`).

A detector family is registered under the ``model.name`` values it builds; the trainer,
the evaluation, the search and the benchmarks use only the functions below.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from jaxrank import models
>>> model_config = models.default_model_config("atss")
>>> model_config.update(backbone="tiny", image_size=64, num_classes=3)
>>> loss_config = models.family_of(model_config).default_loss_config("rank_sort")
>>> detector = models.build_detector(model_config, loss_config, rngs=nnx.Rngs(0))
>>> detector.detect(jnp.zeros((1, 64, 64, 3))).boxes.shape
(1, 100, 4)
"""

from jaxrank.models import dense, query_based, two_stage
from jaxrank.models.family import (
  Detector,
  DetectorFamily,
  TrainingSetup,
  build_detector,
  check_config,
  default_model_config,
  family_of,
  init_loss_state,
  model_names,
  prepare_loss_config,
  recipe_config,
  recipe_names,
  register_family,
  unregister_family,
)
from jaxrank.models.layers import Frozen
from jaxrank.models.pretrained import load_torchvision_resnet
from jaxrank.models.resnet import BACKBONES, ResNet, TinyBackbone, build_backbone

register_family(dense.FAMILY)
register_family(two_stage.FAMILY)
register_family(query_based.FAMILY)

__all__ = [
    "BACKBONES",
    "Detector",
    "DetectorFamily",
    "Frozen",
    "ResNet",
    "TinyBackbone",
    "TrainingSetup",
    "build_backbone",
    "build_detector",
    "check_config",
    "default_model_config",
    "dense",
    "family_of",
    "init_loss_state",
    "load_torchvision_resnet",
    "model_names",
    "prepare_loss_config",
    "query_based",
    "recipe_config",
    "recipe_names",
    "register_family",
    "two_stage",
    "unregister_family",
]
