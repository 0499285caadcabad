"""Deformable DETR R50 (box refinement, two-stage) with its focal + L1 + GIoU set loss on COCO.

Reproduces fundamentalvision/Deformable-DETR
``configs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh`` (README:
46.9 AP, 50 epochs). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # fundamentalvision/Deformable-DETR main.py defaults + --with_box_refine --two_stage
  c = presets.deformable_detr_base("detr_focal")
  c.name = "coco_deformable_detr_focal"
  c.model.num_queries = 300
  c.model.encoder_layers = 6
  c.model.decoder_layers = 6
  c.model.dropout = 0.1
  c.loss.name = "focal"
  c.loss.cls_weight = 2.0  # cls_loss_coef
  c.loss.l1_weight = 5.0  # bbox_loss_coef
  c.loss.giou_weight = 2.0  # giou_loss_coef
  c.loss.match_class = 2.0  # set_cost_class
  c.loss.match_l1 = 5.0  # set_cost_bbox
  c.loss.match_giou = 2.0  # set_cost_giou
  c.data.image_size = 800  # published: multi-scale 480-800 (max 1333) + random crop
  c.data.augment = "flip"
  return c
