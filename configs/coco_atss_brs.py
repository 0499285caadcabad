"""ATSS R50-FPN with Bucketed Rank & Sort Loss on COCO (1x schedule).

Reproduces blisgard/BucketedRankingBasedLosses
``configs/bucketed_ranking_losses/bucketed_ranksort_loss_atss_r50_fpn_1x_coco.py``
(README ATSS BRS). Usage: see ``configs/__init__.py``.
"""

from jaxrank.configs import coco_atss_rs


def get_config():
  # blisgard/BucketedRankingBasedLosses
  #   configs/bucketed_ranking_losses/bucketed_ranksort_loss_atss_r50_fpn_1x_coco.py:
  # RS-ATSS's model, assigner, NMS and 1x schedule with the bucketed loss.
  c = coco_atss_rs.get_config()
  c.name = "coco_atss_brs"
  c.loss.name = "bucketed_rank_sort"  # BucketedRankSort; score-weighted GIoU, value-ratio balance
  c.loss.delta = 0.5
  return c
