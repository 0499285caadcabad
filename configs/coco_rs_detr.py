"""RS-DETR R50: BRS-DETR with the exact Rank & Sort Loss on every head, on COCO, 12 epochs.

The BRS-DETR config (``configs/coco_brs_detr.py``) with ``loss.name = 'rank_sort'`` in place of
the bucketed loss (the bucketed paper reports RS on Co-DETR only as ~6x slower training with the
published PyTorch loss; no AP is published for it). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  c = presets.co_detr_base("rs_detr")
  c.name = "coco_rs_detr"
  c.model.num_queries = 300
  c.model.aux_queries = 300
  c.loss.name = "rank_sort"
  c.loss.delta = 0.5
  c.loss.cls_weight = 2.0
  c.loss.match_class = 4.0
  c.loss.aux_weight = 5.0
  c.loss.aux_rpn_weight = 0.2
  c.loss.aux_query_weight = 1.0
  c.data.image_size = 800
  c.data.augment = "flip"
  c.train.ranking = "per_device"
  return c
