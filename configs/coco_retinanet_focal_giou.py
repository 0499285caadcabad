"""RetinaNet R50-FPN with focal + GIoU loss on COCO, as the PAP repository's baseline.

Reproduces fundamentalvision/Parameterized-AP-Loss
``configs/paploss/focal+giou_retinanet_r50_fpn.py``
(README "Focal Loss + GIoU"). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # fundamentalvision/Parameterized-AP-Loss configs/paploss/focal+giou_retinanet_r50_fpn.py
  c = presets.coco500_base()  # SSD-style 512, 100 epochs, x0.1 at 60 and 80
  c.name = "coco_retinanet_focal_giou"
  c.model.name = "retinanet"  # FPN P6 from C5 (add_extra_convs='on_input'), 4-conv head
  c.model.anchor_ratios = (0.5, 1.0, 2.0)
  c.model.octave_base_scale = 4.0
  c.model.scales_per_octave = 2  # 6 anchors per location
  c.model.box_stds = (1.0, 1.0, 1.0, 1.0)  # target_stds; GIoU on decoded boxes
  c.loss.name = "focal_giou"  # FocalLoss gamma 2, alpha 0.25; GIoULoss
  c.loss.assigner = "max_iou"  # MaxIoUAssigner pos 0.5, neg 0.4, min_pos_iou 0
  c.loss.box_loss_weight = 2.0
  c.optimizer.lr = 0.016
  c.optimizer.lr_reference_batch_size = 64  # 8 images x 8 GPUs
  c.train.batch_size = 64
  c.eval.iou_threshold = 0.5
  return c
