"""Flax NNX detectors (RetinaNet, ATSS-style) and the loss recipes that train them.

>>> from flax import nnx
>>> from jaxrank import models
>>> config = models.default_model_config()
>>> config.update(backbone="tiny", image_size=64, num_classes=3)
>>> detector = models.build_detector(config, rngs=nnx.Rngs(0))
>>> detector.anchors.shape
(774, 4)
"""

from jaxrank.models.detector import (DETECTORS, Detector, DetectorOutputs, DetectorStatic,
                                     build_detector, check_model_config, default_model_config)
from jaxrank.models.layers import Frozen
from jaxrank.models.pretrained import load_torchvision_resnet
from jaxrank.models.recipes import (LOSS_NAMES, check_loss_config, default_loss_config,
                                    detection_loss, init_loss_state, recipe_model_config)
from jaxrank.models.resnet import BACKBONES, ResNet, TinyBackbone, build_backbone

__all__ = [
    "BACKBONES",
    "DETECTORS",
    "LOSS_NAMES",
    "Detector",
    "DetectorOutputs",
    "DetectorStatic",
    "Frozen",
    "ResNet",
    "TinyBackbone",
    "build_backbone",
    "build_detector",
    "check_loss_config",
    "check_model_config",
    "default_loss_config",
    "default_model_config",
    "detection_loss",
    "init_loss_state",
    "load_torchvision_resnet",
    "recipe_model_config",
]
