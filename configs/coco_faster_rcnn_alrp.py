"""aLRP Loss Faster R-CNN R50-FPN (aLRP Loss on the RPN and the R-CNN) on COCO.

Reproduces kemaloksuz/aLRPLoss ``configs/alrp_loss/alrp_loss_faster_rcnn_r50_fpn_100e_coco500.py``
(aLRP README: 40.7 AP). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # kemaloksuz/aLRPLoss configs/alrp_loss/alrp_loss_faster_rcnn_r50_fpn_100e_coco500.py
  c = presets.coco_recipe_base("faster_rcnn_alrp", base="coco500")  # SSD-style 512, 100 epochs
  c.name = "coco_faster_rcnn_alrp"
  c.model.rpn_box_stds = (0.1, 0.1, 0.2, 0.2)
  c.loss.name = "alrp"  # delta 1; RPN errors GIoU / (2 (1 - 0.7)), x0.2 (head_weight)
  c.loss.delta = 1.0
  c.loss.rpn_weight = 0.2
  c.loss.rpn_sampler = "all"  # PseudoSampler in both heads
  c.loss.rcnn_sampler = "all"
  c.loss.alrp_period = 0  # one epoch (3665 iterations at batch 32)
  c.loss.alrp_initial_weight = 50.0
  c.optimizer.lr = 0.012
  c.optimizer.lr_reference_batch_size = 32  # 8 images x 4 GPUs (README)
  c.optimizer.decay_epochs = (75, 95)
  c.train.batch_size = 32
  c.eval.score_threshold = 0.05
  c.eval.iou_threshold = 0.5
  return c
