"""Deformable DETR R50 (box refinement, two-stage) trained with Parameterized AP Loss on COCO.

No published config exists (the PAP paper reports Deformable DETR without releasing code):
PAP over the flattened queries x classes with the GIoU quality of the matched predictions,
the RetinaNet search's functions, L1 x 5, Deformable DETR's matching costs and training (see
``jaxrank/models/query_based/recipes.py``). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  c = presets.deformable_detr_base("detr_pap")
  c.name = "coco_deformable_detr_pap"
  c.model.num_queries = 300
  c.model.dropout = 0.1
  c.loss.name = "pap"
  c.loss.pap_preset = "retinanet"
  c.loss.l1_weight = 5.0
  c.loss.match_class = 2.0
  c.loss.match_l1 = 5.0
  c.loss.match_giou = 2.0
  c.data.image_size = 800
  c.data.augment = "flip"
  c.train.ranking = "per_device"
  return c
