"""Faster R-CNN R50-FPN with Parameterized AP Loss as each head's only loss on COCO.

Reproduces fundamentalvision/Parameterized-AP-Loss ``configs/paploss/paploss_fasterrcnn_r50_fpn.py``
(PAP README: 42.0 AP). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # fundamentalvision/Parameterized-AP-Loss configs/paploss/paploss_fasterrcnn_r50_fpn.py
  c = presets.coco_recipe_base("faster_rcnn_pap", base="coco500")  # SSD-style 512, 100 epochs
  c.name = "coco_faster_rcnn_pap"
  c.model.rpn_box_stds = (0.1, 0.1, 0.2, 0.2)
  c.loss.name = "pap"  # quality (GIoU + 1) / 2 of the decoded boxes in both heads
  # The RPN train_cfg inherits the base RandomSampler (256 anchors per image, half positive)
  # and the PAP RPN head ranks only the sampled anchors; the R-CNN keeps every proposal
  # (PseudoSampler, no gt appended).
  c.loss.rpn_sampler = "random"
  c.loss.rpn_num_samples = 256
  c.loss.rpn_pos_fraction = 0.5
  c.loss.rcnn_sampler = "all"
  c.loss.pap_rpn_preset = "faster_rcnn_rpn"  # ctrl_points and reg_weight 1.6950
  c.loss.pap_rcnn_preset = "faster_rcnn_rcnn"  # ctrl_points and reg_weight 7.1324
  c.loss.pap_top_k = 100_000  # num_topk
  c.optimizer.lr = 0.024
  c.optimizer.lr_reference_batch_size = 64  # 8 images x 8 GPUs (the search config: 0.012 for 32)
  c.optimizer.decay_epochs = (75, 95)
  c.train.batch_size = 64
  c.eval.score_threshold = 0.05  # the config's comment: 0.05 for accurate results (0.5 fast)
  c.eval.iou_threshold = 0.5
  return c
