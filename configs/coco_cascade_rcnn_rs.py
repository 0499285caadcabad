"""RS-Cascade R-CNN R50-FPN: Rank & Sort Loss on the RPN and all three stages on COCO (1x).

Reproduces blisgard/BucketedRankingBasedLosses
``configs/ranksort_loss/ranksort_loss_cascade_rcnn_r50_fpn_1x_coco.py`` (BR README: 41.1 AP;
RS README: 41.3). Usage: see ``configs/__init__.py``.
"""

from jaxrank.train import presets


def get_config():
  # blisgard/BucketedRankingBasedLosses
  # configs/ranksort_loss/ranksort_loss_cascade_rcnn_r50_fpn_1x_coco.py
  c = presets.coco_recipe_base("cascade_rcnn_rank_sort")
  c.name = "coco_cascade_rcnn_rs"
  # RPN as RS-Faster R-CNN but allowed_border=0: anchors crossing the border are ignored.
  c.model.rpn_box_stds = (0.1, 0.1, 0.2, 0.2)
  c.model.rpn_allowed_border = 0.0
  c.model.rpn_train_pre_nms = 2000
  c.model.rpn_train_post_nms = 1000
  c.model.rpn_test_pre_nms = 1000
  c.model.rpn_test_post_nms = 1000
  # RankBasedCascadeRoIHead: 3 stages, MaxIoU 0.5 / 0.6 / 0.7, stage_loss_weights [1, 1, 1],
  # target_stds 0.1/0.1/0.2/0.2 in every stage, reg_class_agnostic, GIoU on decoded boxes.
  c.model.stage_iou_thresholds = (0.5, 0.6, 0.7)
  c.model.stage_loss_weights = (1.0, 1.0, 1.0)
  c.model.stage_box_stds = ((0.1, 0.1, 0.2, 0.2),) * 3
  c.model.class_agnostic = True
  c.loss.name = "rank_sort"
  c.loss.delta = 0.5
  c.loss.rpn_weight = 0.2
  c.loss.rcnn_sampler = "all_with_gt"  # RandomSampler num=1e10, add_gt_as_proposals
  c.data.image_size = 800  # published (1333, 800) keep ratio; here square
  c.data.augment = "flip"
  c.optimizer.lr = 0.012
  c.optimizer.lr_reference_batch_size = 16  # 4 images x 4 GPUs
  c.optimizer.warmup_ratio = 0.001
  c.optimizer.decay_epochs = (8, 11)
  c.optimizer.grad_clip_norm = 0.0
  c.train.batch_size = 16
  c.train.num_epochs = 12
  c.eval.score_threshold = 0.4  # test_cfg rcnn score_thr
  c.eval.iou_threshold = 0.5
  c.eval.max_detections = 100
  return c
