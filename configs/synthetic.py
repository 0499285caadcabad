"""Any loss recipe on the built-in synthetic shapes with a tiny detector (CPU minutes).

  python -m jaxrank.train --config configs/synthetic.py:alrp

ARG: a published recipe (``python -m jaxrank.train --list_configs`` lists them).
One-stage: focal_smooth_l1, focal_giou, ap_smooth_l1, alrp, rank_sort (default),
bucketed_rank_sort, bucketed_ap, pap. Two-stage: faster_rcnn_ce_smooth_l1,
faster_rcnn_ce_giou, faster_rcnn_rank_sort, faster_rcnn_bucketed_rank_sort, faster_rcnn_alrp,
faster_rcnn_pap, cascade_rcnn_rank_sort, cascade_rcnn_bucketed_rank_sort. Query-based:
detr_focal, detr_rank_sort, detr_bucketed_rank_sort, detr_pap, co_detr_focal, rs_detr, brs_detr.
"""

from jaxrank.train import presets


def get_config(arg=None):
  return presets.synthetic_config(arg or "rank_sort")
