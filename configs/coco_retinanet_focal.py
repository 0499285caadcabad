"""RetinaNet R50-FPN with focal + smooth L1 loss on COCO, as mmdet v1's 1x RetinaNet.

Reproduces open-mmlab/mmdetection v1.x (08ef678) ``configs/retinanet_r50_fpn_1x.py``: the
RetinaNet config with smooth L1 (beta 0.11), coder stds 1, warmup ratio 1/3 and gradient
clipping at 35. Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # open-mmlab/mmdetection v1.x (08ef678) configs/retinanet_r50_fpn_1x.py
  c = presets.coco_base()
  c.name = "coco_retinanet_focal"
  c.model.name = "retinanet"  # FPN P6 from C5 (add_extra_convs=True), 4-conv head
  c.model.anchor_ratios = (0.5, 1.0, 2.0)
  c.model.octave_base_scale = 4.0
  c.model.scales_per_octave = 3  # 9 anchors per location
  c.model.box_stds = (1.0, 1.0, 1.0, 1.0)  # target_stds
  c.loss.name = "focal_smooth_l1"  # FocalLoss gamma 2, alpha 0.25; SmoothL1Loss beta 0.11
  c.loss.assigner = "max_iou"  # MaxIoUAssigner pos 0.5, neg 0.4, min_pos_iou 0
  c.loss.box_loss_weight = 1.0
  c.data.image_size = 800  # published (1333, 800) keep ratio; here the long side, square
  c.data.augment = "flip"
  c.optimizer.lr = 0.01
  c.optimizer.lr_reference_batch_size = 16  # 2 images x 8 GPUs
  c.optimizer.warmup_ratio = 1 / 3
  c.optimizer.decay_epochs = (8, 11)
  c.optimizer.grad_clip_norm = 35.0
  c.train.batch_size = 16
  c.train.num_epochs = 12
  c.eval.iou_threshold = 0.5
  return c
