"""Building blocks of the config files in ``configs/``.

* :func:`synthetic_config`: a tiny detector on the built-in synthetic shapes, for CPU runs
  of every loss recipe in minutes.
* :func:`coco_config`: the published COCO recipes (detector, anchors, loss, optimiser,
  schedule, batch, image size) from the reference implementations
  (``../shared/spec/losses.md`` sections 2.5, 3.5 and 4.4).

Linear scaling rule: published learning rates are given with the global batch they were
tuned for (``optimizer.lr_reference_batch_size``); the trainer uses
``lr * train.batch_size / lr_reference_batch_size``, so changing ``train.batch_size``
keeps the recipe (Goyal et al., 2017). The number of warmup iterations is kept as
published.
"""

from __future__ import annotations

from jaxrank.models import dense
from jaxrank.train.config import ConfigDict, base_config

RANKING_RECIPES = ("ap_smooth_l1", "alrp", "rank_sort", "bucketed_rank_sort", "bucketed_ap", "pap")
#: PAP rows (``loss.pap_top_k``) for the synthetic sizes: about 7% of the ~27k scores of a
#: batch of 8 images at 96 px (the published 1e5 is ~0.5% of a COCO batch's scores).
SYNTHETIC_PAP_TOP_K = 2000


def synthetic_config(loss_name: str = "rank_sort", *, name: str | None = None) -> ConfigDict:
  """Tiny detector of the recipe's kind (RetinaNet or ATSS) on 96 px synthetic shapes.

  Tuned for the default run (RS loss): AdamW 2e-3 at batch 8 with a cosine schedule,
  2400 steps (~9 epochs of 2048 images); COCO AP@[.5:.95] about 0.56 on the 256
  validation images after 6-8 minutes on a 2-core CPU.
  """
  c = base_config()
  c.name = name or f"synthetic_{loss_name}"
  model = dense.recipe_model_config(loss_name)
  # Tiny GroupNorm backbone trained from scratch, P3-P5 (strides 8-32), small head.
  model.backbone = "tiny"
  model.norm = "group_norm"
  model.frozen_stages = -1
  model.fpn_channels = 64
  model.min_level = 3
  model.max_level = 5
  model.head_convs = 2
  model.head_channels = 64
  # Anchors of 2 strides (16 px at stride 8 .. ~100 px at stride 32) fit 12-72 px objects.
  model.octave_base_scale = 2.0
  model.image_size = c.data.get_ref("image_size")
  model.num_classes = c.data.get_ref("num_classes")
  c.model = model
  c.loss = dense.default_loss_config(loss_name)
  if loss_name == "pap":
    c.loss.pap_top_k = SYNTHETIC_PAP_TOP_K

  c.data.source = "synthetic"
  c.data.image_size = 96
  c.data.num_classes = 3
  c.data.num_train = 2048
  c.data.num_val = 256
  c.data.max_objects = 6
  c.data.min_object_size = 12
  c.data.max_boxes = 16
  c.data.augment = "flip"

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

  c.train.batch_size = 8
  c.train.num_epochs = 0
  c.train.num_steps = 2400
  c.train.log_every = 50
  c.train.eval_every = 800
  c.train.checkpoint_every = 600
  c.train.keep_checkpoints = 2

  c.eval.batch_size = 32
  # Ranking losses only order the scores: after a short training they stay low (the
  # positives' sigmoid is often < 0.05), so keep the 100 best detections of every image.
  c.eval.score_threshold = 0.0
  c.eval.max_detections = 100
  return c


# Published COCO recipes. ``lr`` is the published rate at the published global batch.
_COCO = {
  # RetinaNet R50-FPN, focal + smooth L1: mmdet's 1x schedule (also the baseline the
  # ranking-loss papers compare with). 1333x800 in mmdet; square 800 here.
  "retinanet_focal": dict(
    loss="focal_smooth_l1", image_size=800, augment="flip", batch=16, lr=0.01,
    epochs=12, decay_epochs=(8, 11), warmup_ratio=0.001),
  # AP Loss RetinaNet R50 (aLRP repo, spec 2.5): SSD-style aug. at 512, 8 images x 4 GPUs,
  # SGD lr 0.002, 100 epochs, lr x0.1 at 60 and 80. (cccorn: lr 0.001 at 2x8 images.)
  "retinanet_ap": dict(
    loss="ap_smooth_l1", image_size=512, augment="ssd", batch=32, lr=0.002,
    epochs=100, decay_epochs=(60, 80), warmup_ratio=0.001),
  # aLRP RetinaNet R50 (spec 3.5): SSD-style aug. at 512, 8 images x 4 GPUs, SGD lr 0.008,
  # 100 epochs, lr x0.1 at 75 and 95 (60/80 for the '*' models), SB period = 1 epoch.
  "retinanet_alrp": dict(
    loss="alrp", image_size=512, augment="ssd", batch=32, lr=0.008,
    epochs=100, decay_epochs=(75, 95), warmup_ratio=0.001),
  # RS-ATSS R50 (spec 4.4): 4 images x 4 GPUs, SGD lr 0.008, 1x (12 epochs, x0.1 at 8, 11),
  # 1333x800 in mmdet; square 800 here.
  "atss_rs": dict(
    loss="rank_sort", image_size=800, augment="flip", batch=16, lr=0.008,
    epochs=12, decay_epochs=(8, 11), warmup_ratio=0.001),
  # Bucketed RS / AP ATSS R50 (BR repo, spec 5 + 4.4): same schedule as RS-ATSS.
  "atss_brs": dict(
    loss="bucketed_rank_sort", image_size=800, augment="flip", batch=16, lr=0.008,
    epochs=12, decay_epochs=(8, 11), warmup_ratio=0.001),
  "atss_bap": dict(
    loss="bucketed_ap", image_size=800, augment="flip", batch=16, lr=0.008,
    epochs=12, decay_epochs=(8, 11), warmup_ratio=0.001),
  # PAP RetinaNet R50 (spec 6.6): SSD-style aug. at 512, 8 images x 8 GPUs, SGD lr 0.016,
  # 100 epochs, lr x0.1 at 60 and 80, the searched functions (loss.pap_preset='retinanet').
  "retinanet_pap": dict(
    loss="pap", image_size=512, augment="ssd", batch=64, lr=0.016,
    epochs=100, decay_epochs=(60, 80), warmup_ratio=0.001),
}
COCO_RECIPES = tuple(_COCO)


def coco_config(recipe: str, *, source: str = "coco_folder") -> ConfigDict:
  """A published COCO recipe (see ``_COCO``): ResNet-50 (ImageNet weights from
  ``model.pretrained``), SGD momentum 0.9, weight decay 1e-4, linear warmup of 500
  iterations from 0.001 x lr, step decay x0.1, per-GPU ranking (``train.ranking =
  'per_device'``) as published."""
  if recipe not in _COCO:
    raise ValueError(f"unknown COCO recipe {recipe!r}; known: {COCO_RECIPES}")
  p = _COCO[recipe]
  c = base_config()
  c.name = f"coco_{recipe}"
  model = dense.recipe_model_config(p["loss"])
  model.backbone = "resnet50"
  model.norm = "frozen_bn"
  model.frozen_stages = 1
  model.pretrained = ""  # path of torchvision resnet50 weights (.pth or .npz)
  model.image_size = c.data.get_ref("image_size")
  model.num_classes = c.data.get_ref("num_classes")
  c.model = model
  c.loss = dense.default_loss_config(p["loss"])

  c.data.source = source
  c.data.image_size = p["image_size"]
  c.data.num_classes = 80
  c.data.max_boxes = 100
  c.data.augment = p["augment"]
  c.data.train_images = "data/coco/train2017"
  c.data.train_annotations = "data/coco/annotations/instances_train2017.json"
  c.data.val_images = "data/coco/val2017"
  c.data.val_annotations = "data/coco/annotations/instances_val2017.json"

  c.optimizer.name = "sgd"
  c.optimizer.lr = p["lr"]
  c.optimizer.lr_reference_batch_size = p["batch"]
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 500
  c.optimizer.warmup_ratio = p["warmup_ratio"]
  c.optimizer.schedule = "step"
  c.optimizer.decay_epochs = p["decay_epochs"]
  c.optimizer.decay_factor = 0.1
  c.optimizer.grad_clip_norm = 35.0 if p["loss"] == "focal_smooth_l1" else 0.0

  c.train.batch_size = p["batch"]
  c.train.num_epochs = p["epochs"]
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
