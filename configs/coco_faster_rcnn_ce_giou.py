"""Faster R-CNN R50-FPN baseline: cross-entropy + GIoU (sampled RoIs), 100 epochs at 512 on COCO.

Reproduces fundamentalvision/Parameterized-AP-Loss ``configs/paploss/CE+giou_fasterrcnn_r50_fpn.py``
(PAP README: 39.1 AP; aLRP README: 38.2). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # fundamentalvision/Parameterized-AP-Loss configs/paploss/CE+giou_fasterrcnn_r50_fpn.py
  c = presets.coco_recipe_base("faster_rcnn_ce_giou", base="coco500")  # SSD-style 512, 100 epochs
  c.name = "coco_faster_rcnn_ce_giou"
  c.model.rpn_box_stds = (1.0, 1.0, 1.0, 1.0)
  c.loss.name = "ce_giou"  # RPN BCE + L1; R-CNN softmax CE + 10 x GIoU of decoded boxes
  c.loss.rpn_sampler = "random"  # RandomSampler 256, pos_fraction 0.5
  c.loss.rpn_num_samples = 256
  c.loss.rpn_pos_fraction = 0.5
  c.loss.rcnn_sampler = "random"  # RandomSampler 512, pos_fraction 0.25, gt added
  c.loss.rcnn_num_samples = 512
  c.loss.rcnn_pos_fraction = 0.25
  c.optimizer.lr = 0.04
  # 8 images per GPU; the GPU count is not stated (the PAP README's commands use 8).
  c.optimizer.lr_reference_batch_size = 64
  c.optimizer.decay_epochs = (75, 95)
  c.train.batch_size = 64
  c.eval.score_threshold = 0.05
  c.eval.iou_threshold = 0.5
  return c
