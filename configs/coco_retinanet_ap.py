"""RetinaNet R50-FPN with AP Loss + smooth L1 on COCO (SSD-style 512, 100 epochs).

Reproduces kemaloksuz/aLRPLoss ``configs/alrp_loss/ap_loss_retinanet_r50_fpn_100e_coco500.py``
(README "AP Loss*"). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # kemaloksuz/aLRPLoss configs/alrp_loss/ap_loss_retinanet_r50_fpn_100e_coco500.py
  c = presets.coco500_base()  # SSD-style 512, 100 epochs, x0.1 at 60 and 80
  c.name = "coco_retinanet_ap"
  c.model.name = "retinanet"  # FPN P6 from C5 (add_extra_convs='on_input'), 4-conv head
  c.model.anchor_ratios = (0.5, 1.0, 2.0)
  c.model.octave_base_scale = 4.0
  c.model.scales_per_octave = 2  # 6 anchors per location
  c.model.box_stds = (0.1, 0.1, 0.2, 0.2)
  c.loss.name = "ap_smooth_l1"  # SmoothL1Loss beta 1, mean over positives x 4 coordinates
  c.loss.assigner = "max_iou"  # MaxIoUAssigner pos 0.5, neg 0.4, min_pos_iou 0
  c.loss.delta = 1.0
  c.loss.box_loss_weight = 1.0
  c.optimizer.lr = 0.002
  c.optimizer.lr_reference_batch_size = 32  # 8 images x 4 GPUs
  c.train.batch_size = 32
  c.eval.iou_threshold = 0.5
  return c
