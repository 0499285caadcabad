"""Any loss recipe on the built-in synthetic shapes with a tiny detector (CPU minutes).

  python -m jaxrank.train --config configs/synthetic.py:alrp

ARG: focal_smooth_l1, focal_giou, ap_smooth_l1, alrp, rank_sort (default),
bucketed_rank_sort, bucketed_ap, pap.
"""

from jaxrank.train import presets


def get_config(arg=None):
  return presets.synthetic_config(arg or "rank_sort")
