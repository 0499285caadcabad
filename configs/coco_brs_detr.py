"""BRS-DETR R50 (Co-Deformable-DETR with bucketed Rank & Sort on every head) on COCO, 12 epochs.

blisgard/BucketedRankingBasedLosses ``projects/configs/co_deformable_detr/
bucketed_co_deformable_detr_r50_1x_coco_iou_lr_2e-4_step_10_11_divide_5_fixed_seed_1187060654_
15072024.py`` (R50 50.1 AP against Co-DETR's 49.3): bucketed RS x 2 on the query head (all 6
decoder layers and the class-agnostic encoder proposals; IoU targets; L1 and GIoU value-balanced;
focal class cost 4), on the positive queries (λ1 = 1), on the RPN (5 x 0.2), the RoI head (5,
sigmoid, all proposals, no gt appended) and the ATSS head (5, no centerness); AdamW 2e-4 at
4 images x 4 GPUs, x0.2 at epochs 10 and 11. Fixed 800 px frames instead of the published
multi-scale resize and crop. Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  c = presets.co_detr_base("brs_detr")
  c.name = "coco_brs_detr"
  c.model.num_queries = 300
  c.model.aux_queries = 300  # max_pos_coords
  c.model.ffn_dim = 2048
  c.model.dropout = 0.0
  c.loss.name = "bucketed_rank_sort"
  c.loss.delta = 0.5
  c.loss.cls_weight = 2.0  # query head rank_loss_type loss_weight
  c.loss.match_class = 4.0  # FocalLossCost weight
  c.loss.aux_weight = 5.0  # rank_loss_type loss_weight of the RPN, RoI and ATSS heads
  c.loss.aux_rpn_weight = 0.2  # RankBasedRPNHead head_weight
  c.loss.aux_query_weight = 1.0  # lambda_1
  c.data.image_size = 800
  c.data.augment = "flip"
  c.train.ranking = "per_device"  # one ranking per GPU, as published
  return c
