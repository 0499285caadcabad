"""Faster R-CNN R50-FPN baseline: cross-entropy + L1 (sampled RoIs), 100 epochs at 512 on COCO.

Reproduces fundamentalvision/Parameterized-AP-Loss ``configs/paploss/CE+L1_fasterrcnn_r50_fpn.py``
(PAP README: 39.0 AP; aLRP README "Cross Entropy+Smooth L1": 37.8; both configs use L1Loss).
Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # fundamentalvision/Parameterized-AP-Loss configs/paploss/CE+L1_fasterrcnn_r50_fpn.py
  c = presets.coco_recipe_base("faster_rcnn_ce_smooth_l1", base="coco500")  # SSD 512, 100 ep.
  c.name = "coco_faster_rcnn_ce_smooth_l1"
  c.model.rpn_box_stds = (1.0, 1.0, 1.0, 1.0)
  c.loss.name = "ce_smooth_l1"  # RPN BCE + L1; R-CNN softmax CE + L1Loss (no Smooth L1)
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
