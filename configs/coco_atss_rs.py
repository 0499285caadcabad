"""RS-ATSS R50-FPN with Rank & Sort Loss on COCO (1x schedule).

Reproduces kemaloksuz/RankSortLoss ``configs/ranksort_loss/ranksort_atss_r50_fpn_1x_coco.py``
(README "RS-ATSS"). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # kemaloksuz/RankSortLoss configs/ranksort_loss/ranksort_atss_r50_fpn_1x_coco.py
  c = presets.coco_base()
  c.name = "coco_atss_rs"
  c.model.name = "atss"  # FPN P6 from P5 ('on_output'), GroupNorm head with per-level scales
  c.model.anchor_ratios = (1.0,)
  c.model.octave_base_scale = 4.0
  c.model.scales_per_octave = 3  # 3 anchors per location
  c.model.box_stds = (0.1, 0.1, 0.2, 0.2)
  c.loss.name = "rank_sort"  # RankSort; score-weighted GIoU, value-ratio balance
  c.loss.assigner = "atss"  # ATSSAssigner topk 9
  c.loss.delta = 0.5
  c.data.image_size = 800  # published (1333, 800) keep ratio; here the long side, square
  c.data.augment = "flip"
  c.optimizer.lr = 0.008
  c.optimizer.lr_reference_batch_size = 16  # 4 images x 4 GPUs
  c.optimizer.warmup_ratio = 0.001
  c.optimizer.decay_epochs = (8, 11)
  c.optimizer.grad_clip_norm = 0.0
  c.train.batch_size = 16
  c.train.num_epochs = 12
  c.eval.iou_threshold = 0.6  # test_cfg nms iou_threshold
  return c
