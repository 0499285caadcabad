"""Building blocks of the config files in ``configs/``.

* :func:`synthetic_config`: a tiny detector on the built-in synthetic shapes, for CPU runs
  of every loss recipe in minutes.
* :func:`coco_base`: what every published COCO recipe shares; the ``configs/coco_*.py`` files
  start from it and set each recipe's own values (detector, anchors, coder, loss, image size,
  augmentation, optimiser, schedule, batch, NMS) next to the published config they cite.
* :func:`coco_config`: the ``get_config()`` of a packaged ``configs/coco_<recipe>.py``.

Linear scaling rule: published learning rates are given with the global batch they were
tuned for (``optimizer.lr_reference_batch_size``); the trainer uses
``lr * train.batch_size / lr_reference_batch_size``, so changing ``train.batch_size``
keeps the recipe (Goyal et al., 2017). The number of warmup iterations is kept as
published.
"""

from __future__ import annotations

import os

import jaxrank.configs as configs_package
from jaxrank import models
from jaxrank.train.config import ConfigDict, base_config, load_config_file

#: PAP rows (``loss.pap_top_k``) for the synthetic sizes: about 7% of the ~27k scores of a
#: batch of 8 images at 96 px (the published 1e5 is ~0.5% of a COCO batch's scores).
SYNTHETIC_PAP_TOP_K = 2000


def synthetic_config(recipe: str = "rank_sort", *, name: str | None = None) -> ConfigDict:
  """A tiny detector of the published ``recipe`` (:func:`jaxrank.models.recipe_names`:
  RetinaNet / ATSS recipes by loss name, two-stage ones as ``faster_rcnn_<loss>`` and
  ``cascade_rcnn_<loss>``, Deformable DETR ones as ``detr_<loss>``, Co-DETR ones as
  ``co_detr_focal``, ``rs_detr``, ``brs_detr``) on 96 px synthetic shapes.

  Tuned for the default run (RS loss on ATSS): AdamW 2e-3 at batch 8 with a cosine
  schedule, 2400 steps (~9 epochs of 2048 images); COCO AP@[.5:.95] about 0.56 on the 256
  validation images after about 3 minutes on an idle 2-core CPU. Two-stage recipes train
  1600 steps, Deformable DETR recipes 2400 at lr 1e-3 (see the README for their APs and
  times).
  """
  c = base_config()
  c.name = name or f"synthetic_{recipe}"
  model, loss = models.recipe_config(recipe)
  # Tiny GroupNorm backbone trained from scratch.
  model.backbone = "tiny"
  model.norm = "group_norm"
  model.frozen_stages = -1
  family = models.family_of(model).name
  if family == "query_based":
    # Deformable DETR with 4 levels (strides 8-64: 12x12 .. 2x2 at 96 px, 193 tokens),
    # 64 channels, 2 + 3 layers, 50 queries, no dropout.
    model.hidden_dim = 64
    model.num_heads = 4
    model.num_points = 4
    model.encoder_layers = 2
    model.decoder_layers = 3
    model.ffn_dim = 256
    model.dropout = 0.0
    model.num_queries = 50
    if model.name == "co_deformable_detr":
      # Co-DETR's auxiliary heads at this size: 50 positive queries per head and image, RPN
      # anchors of 2 strides (16-25 px at stride 8), 1000 / 128 proposals, RoIs pooled with
      # one sample per bin from stride 8 up to 112 px, FC 256, ATSS anchors of 2 strides.
      model.aux_queries = 50
      model.rpn_anchor_scale = 2.0
      model.rpn_train_pre_nms = 1000
      model.rpn_train_post_nms = 128
      model.roi_sampling_ratio = 1
      model.finest_scale = 56.0
      model.fc_channels = 256
      model.atss_anchor_scale = 2.0
  elif family == "two_stage":
    model.fpn_channels = 64
    # P2-P6 (strides 4-64) with anchors of 16 px at stride 4 .. 256 px at stride 64, RoIs of
    # 12-72 px objects pooled from P2-P3; fewer proposals and a smaller box head.
    model.anchor_scale = 4.0
    model.rpn_channels = 64
    model.rpn_train_pre_nms = 1000
    model.rpn_train_post_nms = 128
    model.rpn_test_pre_nms = 500
    model.rpn_test_post_nms = 128
    model.finest_scale = 28.0
    # One sample per bin: what the published adaptive rule (ceil(RoI size / 7) samples)
    # gives for most RoIs of these small objects, and 2.6x faster than 2 on the CPU.
    model.roi_sampling_ratio = 1
    model.fc_channels = 256
  else:
    model.fpn_channels = 64
    # P3-P5 (strides 8-32), small head; anchors of 2 strides (16 px at stride 8 .. ~100 px
    # at stride 32) fit 12-72 px objects.
    model.min_level = 3
    model.max_level = 5
    model.head_convs = 2
    model.head_channels = 64
    model.octave_base_scale = 2.0
  model.image_size = c.data.get_ref("image_size")
  model.num_classes = c.data.get_ref("num_classes")
  c.model = model
  c.loss = loss
  if loss.name == "pap":
    c.loss.pap_top_k = SYNTHETIC_PAP_TOP_K
  two_stage = family == "two_stage"

  c.data.source = "synthetic"
  c.data.image_size = 96
  c.data.num_classes = 3
  c.data.num_train = 2048
  c.data.num_val = 256
  c.data.max_objects = 6
  c.data.min_object_size = 12
  c.data.max_boxes = 16
  c.data.augment = "flip"
  # The images are in memory and cheap to flip and pad: batches built in the training process
  # beat starting loader processes for training and every evaluation (default run on 2 cores,
  # one run each: 168 s in-process, 185 s with 2 loader processes).
  c.data.num_workers = 0

  c.optimizer.name = "adamw"
  c.optimizer.lr = 2e-3
  c.optimizer.lr_reference_batch_size = 8
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.warmup_ratio = 0.01
  c.optimizer.schedule = "cosine"
  c.optimizer.min_lr_ratio = 0.01
  c.optimizer.grad_clip_norm = 10.0

  if family == "query_based":
    # Deformable DETR's clipping and its x0.1 rate for the sampling offsets and reference
    # points (the backbone trains from scratch here, at the full rate).
    c.optimizer.lr = 1e-3
    c.optimizer.grad_clip_norm = 0.1
    c.optimizer.lr_multipliers = (("sampling_offsets", 0.1), ("reference_points", 0.1))

  c.train.batch_size = 8
  c.train.num_epochs = 0
  # Two-stage detectors learn the shapes faster per step and cost ~3x more per step.
  c.train.num_steps = 1600 if two_stage else 2400
  c.train.log_every = 50
  c.train.eval_every = 800
  c.train.checkpoint_every = 400 if two_stage else 600
  c.train.keep_checkpoints = 2

  c.eval.batch_size = 32
  # Ranking losses only order the scores: after a short training they stay low (the
  # positives' sigmoid is often < 0.05), so keep the 100 best detections of every image.
  c.eval.score_threshold = 0.0
  c.eval.max_detections = 100
  return c


#: The ``configs/coco_<recipe>.py`` files (:func:`coco_config`).
COCO_RECIPES = ("retinanet_focal", "retinanet_focal_giou", "retinanet_ap", "retinanet_alrp",
                "retinanet_pap", "atss_rs", "atss_brs", "atss_bap", "faster_rcnn_ce_smooth_l1",
                "faster_rcnn_ce_giou", "faster_rcnn_rs", "faster_rcnn_brs", "faster_rcnn_alrp",
                "faster_rcnn_pap", "cascade_rcnn_rs", "cascade_rcnn_brs",
                "deformable_detr_focal", "deformable_detr_rs", "deformable_detr_brs",
                "deformable_detr_pap", "co_detr_focal", "rs_detr", "brs_detr")


def coco_base(*, source: str = "coco_folder") -> ConfigDict:
  """What all published COCO recipes share (mmdet ``_base_`` files of the RS, BR, aLRP and PAP
  repositories): COCO 2017 folders, ImageNet ResNet-50 FPN with frozen BatchNorm statistics and
  stem + stage 1 frozen, SGD momentum 0.9, weight decay 1e-4, linear warmup over 500
  iterations, step decay x0.1, one ranking per device, and mmdet's test settings (top 1000
  per level before NMS, score 0.05, 100 detections per image).

  The config files set the rest: ``model.name`` and its anchors and coder, the loss, image
  size, augmentation, learning rate and its reference batch, batch, epochs, decay epochs,
  warmup ratio, gradient clipping and the NMS IoU threshold.
  """
  c = base_config()
  c.model.backbone = "resnet50"
  c.model.norm = "frozen_bn"
  c.model.frozen_stages = 1
  c.model.pretrained = ""  # path of torchvision resnet50 weights (.pth or .npz)

  c.data.source = source
  c.data.num_classes = 80
  c.data.max_boxes = 100
  c.data.train_images = "data/coco/train2017"
  c.data.train_annotations = "data/coco/annotations/instances_train2017.json"
  c.data.val_images = "data/coco/val2017"
  c.data.val_annotations = "data/coco/annotations/instances_val2017.json"

  c.optimizer.name = "sgd"
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 500
  c.optimizer.schedule = "step"
  c.optimizer.decay_factor = 0.1

  c.train.num_steps = 0
  c.train.log_every = 50
  c.train.eval_every = 0
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  c.train.ranking = "per_device"

  c.eval.batch_size = 16
  c.eval.score_threshold = 0.05
  c.eval.max_detections = 100
  c.eval.pre_nms_top_k = 1000
  return c


def coco_recipe_base(recipe: str, *, base: str = "coco") -> ConfigDict:
  """:func:`coco_base` (``base='coco'``) or :func:`coco500_base` (``'coco500'``) with the
  model and loss sections of the published ``recipe`` (:func:`jaxrank.models.recipe_config`);
  ``model.image_size`` and ``model.num_classes`` follow ``data``."""
  c = coco_base() if base == "coco" else coco500_base()
  model, loss = models.recipe_config(recipe)
  for field in ("backbone", "norm", "frozen_stages", "pretrained"):
    model[field] = c.model[field]
  model.image_size = c.data.get_ref("image_size")
  model.num_classes = c.data.get_ref("num_classes")
  c.model = model
  c.loss = loss
  return c


def deformable_detr_base(recipe: str) -> ConfigDict:
  """:func:`coco_recipe_base` of a query-based ``recipe`` with Deformable DETR's training
  (fundamentalvision/Deformable-DETR ``main.py`` and ``configs/r50_deformable_detr*.sh``):
  AdamW 2e-4 at batch 32 (8 GPUs x 4), weight decay 1e-4, x0.1 for the backbone, the
  sampling offsets and the reference points, gradient clipping 0.1, no warmup, 50 epochs
  with x0.1 at 40; test: the 100 best (query, class) pairs, no score threshold, no NMS."""
  c = coco_recipe_base(recipe)
  c.optimizer.name = "adamw"
  c.optimizer.lr = 2e-4
  c.optimizer.lr_reference_batch_size = 32
  c.optimizer.momentum = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 1e-4
  c.optimizer.lr_multipliers = (("backbone", 0.1), ("sampling_offsets", 0.1),
                                ("reference_points", 0.1))
  c.optimizer.grad_clip_norm = 0.1
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = "step"
  c.optimizer.decay_epochs = (40,)
  c.optimizer.decay_factor = 0.1
  c.train.batch_size = 32
  c.train.num_epochs = 50
  c.eval.score_threshold = 0.0
  c.eval.max_detections = 100
  return c


def co_detr_base(recipe: str) -> ConfigDict:
  """:func:`deformable_detr_base` of a Co-DETR ``recipe`` ('co_detr_focal', 'rs_detr',
  'brs_detr') with Co-DETR's 1x schedule (Sense-X/Co-DETR ``co_deformable_detr_r50_1x_coco.py``,
  2 images x 8 GPUs; the BR repo's BRS-DETR config, 4 images x 4 GPUs): AdamW 2e-4 at batch
  16, weight decay 1e-4, x0.1 for the backbone, sampling offsets and reference points,
  clipping 0.1, 12 epochs; Co-DETR x0.1 at epoch 11, BRS-DETR (and RS-DETR) x0.2 at 10 and
  11."""
  c = deformable_detr_base(recipe)
  c.optimizer.lr_reference_batch_size = 16
  c.train.batch_size = 16
  c.train.num_epochs = 12
  if recipe == "co_detr_focal":
    c.optimizer.decay_epochs = (11,)
    c.optimizer.decay_factor = 0.1
  else:
    c.optimizer.decay_epochs = (10, 11)
    c.optimizer.decay_factor = 0.2
  return c


def coco500_base(*, source: str = "coco_folder") -> ConfigDict:
  """:func:`coco_base` with what the published 512 recipes (AP Loss, aLRP Loss, Parameterized
  AP Loss and focal + GIoU RetinaNet) share: their repositories'
  ``configs/_base_/datasets/coco500_detection_augm.py`` (SSD-style augmentation at 512) and
  their 100-epoch schedule (warmup ratio 0.001, x0.1 at epochs 60 and 80, no gradient
  clipping)."""
  c = coco_base(source=source)
  c.data.image_size = 512
  c.data.augment = "ssd"
  c.optimizer.warmup_ratio = 0.001
  c.optimizer.decay_epochs = (60, 80)
  c.optimizer.grad_clip_norm = 0.0
  c.train.num_epochs = 100
  return c


def coco_config(recipe: str) -> ConfigDict:
  """The published COCO recipe of the packaged config file ``configs/coco_<recipe>.py``."""
  if recipe not in COCO_RECIPES:
    raise ValueError(f"unknown COCO recipe {recipe!r}; known: {COCO_RECIPES}")
  folder = os.path.dirname(os.path.abspath(configs_package.__file__))
  return load_config_file(os.path.join(folder, f"coco_{recipe}.py"))
