"""The two-stage family: Faster R-CNN and Cascade R-CNN with cross-entropy baselines, RS,
bucketed RS, aLRP and Parameterized AP Loss.

``model.name`` 'faster_rcnn' or 'cascade_rcnn'; ``loss.name`` one of :data:`LOSS_NAMES` (see
:mod:`jaxrank.models.two_stage.recipes`); published recipes :data:`RECIPE_NAMES`
(``'<model>_<loss>'``).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from jaxrank.models import two_stage
>>> config = two_stage.default_model_config("faster_rcnn")
>>> config.update(backbone="tiny", image_size=64, num_classes=3, fpn_channels=16,
...               rpn_channels=16, fc_channels=32)
>>> detector = two_stage.build_detector(config, two_stage.default_loss_config("rank_sort"),
...                                     rngs=nnx.Rngs(0))
>>> detector.detect(jnp.zeros((1, 64, 64, 3)), max_detections=10).boxes.shape
(1, 10, 4)
"""

from jaxrank.models.family import DetectorFamily, ranking_loss_config
from jaxrank.models.two_stage.config import (
  DETECTORS,
  LOSS_NAMES,
  RECIPES,
  AlrpState,
  LossSettings,
  PAPState,
  SamplerState,
  TwoStageStatic,
  check_loss_config,
  check_model_config,
  default_loss_config,
  default_model_config,
  init_loss_state,
  recipe_model_config,
)
from jaxrank.models.two_stage.detector import RoIs, TwoStageDetector, build_detector

#: Published recipes: Faster R-CNN with every loss, Cascade R-CNN with RS and bucketed RS.
RECIPE_NAMES = tuple(f"faster_rcnn_{loss}" for loss in LOSS_NAMES) + (
    "cascade_rcnn_rank_sort", "cascade_rcnn_bucketed_rank_sort")


def recipe_config(name: str):
  """``(model_config, loss_config)`` of the published recipe ``name``."""
  if name not in RECIPE_NAMES:
    raise ValueError(f"unknown two-stage recipe {name!r}; known: {RECIPE_NAMES}")
  model_name = next(m for m in DETECTORS if name.startswith(m + "_"))
  loss_name = name[len(model_name) + 1:]
  return recipe_model_config(model_name, loss_name), default_loss_config(loss_name)


def check_config(model_config, loss_config) -> None:
  """Checks the ``model`` and ``loss`` sections."""
  check_model_config(model_config)
  check_loss_config(loss_config)


FAMILY = DetectorFamily(
    name="two_stage",
    model_names=DETECTORS,
    default_model_config=default_model_config,
    default_loss_config=default_loss_config,
    check_config=check_config,
    build=build_detector,
    init_loss_state=lambda model_config, loss_config: init_loss_state(loss_config),
    prepare_loss_config=ranking_loss_config,
    loss_names=LOSS_NAMES,
    recipe_names=RECIPE_NAMES,
    recipe_config=recipe_config,
)

__all__ = [
    "DETECTORS",
    "FAMILY",
    "LOSS_NAMES",
    "RECIPES",
    "RECIPE_NAMES",
    "AlrpState",
    "LossSettings",
    "PAPState",
    "RoIs",
    "SamplerState",
    "TwoStageDetector",
    "TwoStageStatic",
    "build_detector",
    "check_config",
    "check_loss_config",
    "check_model_config",
    "default_loss_config",
    "default_model_config",
    "init_loss_state",
    "recipe_config",
    "recipe_model_config",
]
