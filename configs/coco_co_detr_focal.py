"""Co-DETR R50 (Co-Deformable-DETR, focal loss) on COCO, 12 epochs.

Sense-X/Co-DETR ``projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py``
(49.5 AP; 49.3 in the bucketed paper): query head focal 2 / L1 5 / GIoU 2 with the same
Hungarian costs; auxiliary heads x 12 (6 decoder layers x λ2 2): RPN BCE + L1 on 256 sampled
anchors, RoI head softmax CE + 10 x GIoU on 512 sampled RoIs (proposals + gt), ATSS focal +
2 x GIoU + centerness; positive queries λ1 = 1; AdamW 2e-4 at 2 images x 8 GPUs, x0.1 at epoch
11. Fixed 800 px frames instead of the published multi-scale resize and crop. Usage: see
``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  c = presets.co_detr_base("co_detr_focal")
  c.name = "coco_co_detr_focal"
  c.model.num_queries = 300
  c.model.aux_queries = 300  # max_pos_coords
  c.loss.name = "focal"
  c.loss.cls_weight = 2.0
  c.loss.l1_weight = 5.0
  c.loss.giou_weight = 2.0
  c.loss.match_class = 2.0
  c.loss.aux_weight = 12.0  # num_dec_layer x lambda_2
  c.loss.aux_rpn_weight = 1.0
  c.loss.aux_query_weight = 1.0  # lambda_1
  c.data.image_size = 800
  c.data.augment = "flip"
  c.train.ranking = "per_device"
  return c
