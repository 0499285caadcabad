"""Bucketed RS-Faster R-CNN R50-FPN: bucketed Rank & Sort Loss on the RPN and the R-CNN (1x).

Reproduces blisgard/BucketedRankingBasedLosses
``configs/bucketed_ranking_losses/bucketed_ranksort_loss_faster_rcnn_r50_fpn_1x_coco.py``
(BR README: 39.5 AP, time 0.58 -> 0.19 against RS). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # blisgard/BucketedRankingBasedLosses
  # configs/bucketed_ranking_losses/bucketed_ranksort_loss_faster_rcnn_r50_fpn_1x_coco.py
  c = presets.coco_recipe_base("faster_rcnn_bucketed_rank_sort")
  c.name = "coco_faster_rcnn_brs"
  # RPN: RankBasedRPNHead (BucketedRankSort), all anchors, MaxIoU 0.7 / 0.3, x0.2.
  c.model.rpn_box_stds = (0.1, 0.1, 0.2, 0.2)
  c.model.rpn_train_pre_nms = 2000  # nms_pre per level
  c.model.rpn_train_post_nms = 1000  # nms_post
  c.model.rpn_test_pre_nms = 1000
  c.model.rpn_test_post_nms = 1000
  c.model.rpn_nms_iou = 0.7
  c.model.finest_scale = 56.0
  c.model.stage_iou_thresholds = (0.5,)  # MaxIoUAssigner 0.5 / 0.5 / 0.5
  c.loss.name = "bucketed_rank_sort"
  c.loss.delta = 0.5
  c.loss.rpn_weight = 0.2  # head_weight
  c.loss.rcnn_sampler = "all_with_gt"  # RandomSampler num=1e10 with the gt added
  c.data.image_size = 800  # published (1333, 800) keep ratio; here square
  c.data.augment = "flip"
  c.optimizer.lr = 0.012
  c.optimizer.lr_reference_batch_size = 16  # 4 images x 4 GPUs
  c.optimizer.warmup_ratio = 0.001
  c.optimizer.decay_epochs = (8, 11)
  c.optimizer.grad_clip_norm = 0.0
  c.train.batch_size = 16
  c.train.num_epochs = 12
  c.eval.score_threshold = 0.4  # test_cfg rcnn score_thr (the config: may cost 0.01 AP)
  c.eval.iou_threshold = 0.5
  c.eval.max_detections = 100
  return c
