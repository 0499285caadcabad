"""The dense one-stage family: RetinaNet and ATSS with every one-stage loss recipe.

``model.name`` 'retinanet' or 'atss'; ``loss.name`` one of :data:`LOSS_NAMES` (the
published recipes, see :mod:`jaxrank.models.dense.recipes`).

>>> from flax import nnx
>>> from jaxrank.models import dense
>>> config = dense.default_model_config()
>>> config.update(backbone="tiny", image_size=64, num_classes=3)
>>> detector = dense.build_detector(config, dense.default_loss_config("rank_sort"),
...                                 rngs=nnx.Rngs(0))
>>> detector.anchors.shape
(774, 4)
"""

from jaxrank.models.dense.config import (
  DETECTORS,
  LOSS_NAMES,
  RECIPES,
  DetectorStatic,
  LossSettings,
  check_loss_config,
  check_model_config,
  default_loss_config,
  default_model_config,
  init_loss_state,
  recipe_model_config,
)
from jaxrank.models.dense.detector import DenseDetector, DetectorOutputs, build_detector
from jaxrank.models.dense.recipes import detection_loss
from jaxrank.models.family import DetectorFamily, ranking_loss_config


def check_config(model_config, loss_config) -> None:
  """Checks the ``model`` and ``loss`` sections."""
  check_model_config(model_config)
  check_loss_config(loss_config)


FAMILY = DetectorFamily(
    name="dense",
    model_names=DETECTORS,
    default_model_config=default_model_config,
    default_loss_config=default_loss_config,
    check_config=check_config,
    build=build_detector,
    init_loss_state=lambda model_config, loss_config: init_loss_state(loss_config),
    prepare_loss_config=ranking_loss_config,
    loss_names=LOSS_NAMES,
    recipe_names=LOSS_NAMES,
    recipe_config=lambda name: (recipe_model_config(name), default_loss_config(name)),
)

__all__ = [
    "DETECTORS",
    "FAMILY",
    "LOSS_NAMES",
    "RECIPES",
    "DenseDetector",
    "DetectorOutputs",
    "DetectorStatic",
    "LossSettings",
    "build_detector",
    "check_config",
    "check_loss_config",
    "check_model_config",
    "default_loss_config",
    "default_model_config",
    "detection_loss",
    "init_loss_state",
    "recipe_model_config",
]
