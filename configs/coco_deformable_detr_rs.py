"""Deformable DETR R50 (box refinement, two-stage) with the exact Rank & Sort Loss on COCO.

The query head of blisgard/BucketedRankingBasedLosses
``projects/models/rank_based_co_deformable_detr_head.py`` (rank + sort x 2 over the flattened
queries x classes, IoU targets, L1 and GIoU value-balanced, focal class cost 4) on Deformable
DETR without Co-DETR's auxiliary heads, trained as Deformable DETR (50 epochs); no published
result for this pairing. Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  c = presets.deformable_detr_base("detr_rank_sort")
  c.name = "coco_deformable_detr_rs"
  c.model.num_queries = 300
  c.model.dropout = 0.1
  c.loss.name = "rank_sort"
  c.loss.delta = 0.5
  c.loss.cls_weight = 2.0  # rank_loss_type loss_weight
  c.loss.match_class = 4.0  # FocalLossCost weight of the BRS-DETR config
  c.loss.match_l1 = 5.0
  c.loss.match_giou = 2.0
  c.data.image_size = 800
  c.data.augment = "flip"
  c.train.ranking = "per_device"  # one ranking per GPU, as published
  return c
