"""The query-based family: Deformable DETR with focal, Rank & Sort, bucketed Rank & Sort and
Parameterized AP set losses, and Co-DETR / RS-DETR / BRS-DETR (Co-Deformable-DETR with
auxiliary RPN + RoI and ATSS heads and their positive queries).

``model.name`` 'deformable_detr' or 'co_deformable_detr'; ``loss.name`` one of
:data:`LOSS_NAMES` (see :mod:`jaxrank.models.query_based.recipes` and
:mod:`jaxrank.models.query_based.co_detr`); published recipes :data:`RECIPE_NAMES`
(``'detr_<loss>'``: box refinement and two-stage; ``'co_detr_focal'``, ``'rs_detr'``,
``'brs_detr'``).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from jaxrank.models import query_based
>>> config = query_based.default_model_config()
>>> config.update(backbone="tiny", image_size=64, num_classes=3, hidden_dim=16, num_heads=2,
...               encoder_layers=1, decoder_layers=2, ffn_dim=32, num_queries=10)
>>> detector = query_based.build_detector(
...     config, query_based.default_loss_config("bucketed_rank_sort"), rngs=nnx.Rngs(0))
>>> detector.detect(jnp.zeros((1, 64, 64, 3)), max_detections=5).boxes.shape
(1, 5, 4)
"""

from jaxrank.models.family import DetectorFamily, ranking_loss_config
from jaxrank.models.query_based import co_detr, detector
from jaxrank.models.query_based.co_detr import CoDeformableDETR
from jaxrank.models.query_based.config import (
  CO_DETR_LOSS_NAMES,
  DETECTORS,
  LOSS_NAMES,
  RECIPES,
  LossSettings,
  QueryLossState,
  QueryStatic,
  check_loss_config,
  check_model_config,
  check_no_aux_weights,
  co_detr_loss_settings,
  default_loss_config,
  default_model_config,
  init_loss_state,
  recipe_model_config,
)
from jaxrank.models.query_based.detector import DeformableDETR

#: Co-DETR recipes: Co-Deformable-DETR with the loss of every head.
CO_DETR_RECIPES = {"co_detr_focal": "focal", "rs_detr": "rank_sort",
                   "brs_detr": "bucketed_rank_sort"}
#: Published recipes: Deformable DETR (box refinement, two-stage) with every loss, and Co-DETR.
RECIPE_NAMES = tuple(f"detr_{loss}" for loss in LOSS_NAMES) + tuple(CO_DETR_RECIPES)


def recipe_config(name: str):
  """``(model_config, loss_config)`` of the published recipe ``name``."""
  if name not in RECIPE_NAMES:
    raise ValueError(f"unknown query-based recipe {name!r}; known: {RECIPE_NAMES}")
  if name in CO_DETR_RECIPES:
    loss_name = CO_DETR_RECIPES[name]
    return default_model_config("co_deformable_detr"), default_loss_config(loss_name)
  loss_name = name[len("detr_"):]
  return recipe_model_config(loss_name), default_loss_config(loss_name)


def build_detector(model_config, loss_config=None, *, rngs):
  """A :class:`DeformableDETR` or :class:`CoDeformableDETR` (by ``model_config.name``);
  loads ``model_config.pretrained`` (torchvision ResNet) if set."""
  if model_config.name == "co_deformable_detr":
    return co_detr.build_detector(model_config, loss_config, rngs=rngs)
  return detector.build_detector(model_config, loss_config, rngs=rngs)


def check_config(model_config, loss_config) -> None:
  """Checks the ``model`` and ``loss`` sections."""
  static = check_model_config(model_config)
  settings = check_loss_config(loss_config)
  if static.aux is not None:
    co_detr_loss_settings(settings)
  check_no_aux_weights(static, settings)


FAMILY = DetectorFamily(
    name="query_based",
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
    "CO_DETR_LOSS_NAMES",
    "CO_DETR_RECIPES",
    "CoDeformableDETR",
    "DETECTORS",
    "FAMILY",
    "LOSS_NAMES",
    "RECIPES",
    "RECIPE_NAMES",
    "DeformableDETR",
    "LossSettings",
    "QueryLossState",
    "QueryStatic",
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
