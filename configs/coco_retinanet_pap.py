"""RetinaNet R50-FPN with Parameterized AP Loss as the only loss on COCO (searched functions).

Reproduces fundamentalvision/Parameterized-AP-Loss ``configs/paploss/paploss_retinanet_r50_fpn.py``
(README PAP RetinaNet). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # fundamentalvision/Parameterized-AP-Loss configs/paploss/paploss_retinanet_r50_fpn.py
  c = presets.coco500_base()  # SSD-style 512, 100 epochs, x0.1 at 60 and 80
  c.name = "coco_retinanet_pap"
  c.model.name = "retinanet"  # FPN P6 from C5 (add_extra_convs='on_input'), 4-conv head
  c.model.anchor_ratios = (0.5, 1.0, 2.0)
  c.model.octave_base_scale = 4.0
  c.model.scales_per_octave = 2  # 6 anchors per location
  c.model.box_stds = (0.1, 0.1, 0.2, 0.2)
  c.loss.name = "pap"  # quality (GIoU + 1) / 2 of the decoded boxes
  c.loss.assigner = "max_iou"  # MaxIoUAssigner pos 0.5, neg 0.4, min_pos_iou 0
  c.loss.pap_preset = "retinanet"  # ctrl_points and reg_weight 4.1231 of the config
  c.loss.pap_top_k = 100_000  # num_topk
  c.optimizer.lr = 0.016
  c.optimizer.lr_reference_batch_size = 64  # 8 images x 8 GPUs
  c.train.batch_size = 64
  c.eval.score_threshold = 0.05  # the config's comment: 0.05 for accurate results (0.5 fast)
  c.eval.iou_threshold = 0.6
  return c
