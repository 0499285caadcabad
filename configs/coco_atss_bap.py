"""ATSS R50-FPN with Bucketed AP Loss on COCO (1x schedule).

Reproduces blisgard/BucketedRankingBasedLosses
``configs/bucketed_ranking_losses/bucketed_ap_loss_atss_r50_fpn_1x_coco.py``
(README ATSS BAP). Usage: see ``configs/__init__.py``.
"""

from jaxrank.configs import coco_atss_rs


def get_config():
  # blisgard/BucketedRankingBasedLosses
  #   configs/bucketed_ranking_losses/bucketed_ap_loss_atss_r50_fpn_1x_coco.py:
  # RS-ATSS's model, assigner, NMS and 1x schedule with bucketed AP and a fixed box weight.
  c = coco_atss_rs.get_config()
  c.name = "coco_atss_bap"
  c.loss.name = "bucketed_ap"  # BucketedAPLoss (delta 1.0 in the head); score-weighted GIoU
  c.loss.delta = 1.0
  c.loss.box_loss_weight = 2.0  # loc_weight
  return c
