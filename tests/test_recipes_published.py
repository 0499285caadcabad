"""Every loss recipe and its COCO config pinned to the published config it reproduces.

The numbers are literals copied from the published config files (named in the comments), so a
change away from them fails here. Known deviations (image resize, frozen BN affine, SSD
augmentation details, nms_pre semantics) are recorded in the README, not tested.
"""

import ast
import os

import pytest

from jaxrank import ops
from jaxrank.models import dense
from jaxrank.train import config as config_lib
from jaxrank.train import optim

from test_train_helpers import REPO

MMDET_V1 = "open-mmlab/mmdetection v1.x (08ef678) configs/retinanet_r50_fpn_1x.py"
PAP_FOCAL_GIOU = ("fundamentalvision/Parameterized-AP-Loss "
                  "configs/paploss/focal+giou_retinanet_r50_fpn.py")
ALRP_AP = "kemaloksuz/aLRPLoss configs/alrp_loss/ap_loss_retinanet_r50_fpn_100e_coco500.py"
ALRP_A = "kemaloksuz/aLRPLoss configs/alrp_loss/alrp_loss_retinanet_r50_fpn_100e_coco500.py"
RS_ATSS = "kemaloksuz/RankSortLoss configs/ranksort_loss/ranksort_atss_r50_fpn_1x_coco.py"
BR_BRS = ("blisgard/BucketedRankingBasedLosses "
          "configs/bucketed_ranking_losses/bucketed_ranksort_loss_atss_r50_fpn_1x_coco.py")
BR_BAP = ("blisgard/BucketedRankingBasedLosses "
          "configs/bucketed_ranking_losses/bucketed_ap_loss_atss_r50_fpn_1x_coco.py")
PAP = "fundamentalvision/Parameterized-AP-Loss configs/paploss/paploss_retinanet_r50_fpn.py"
SOURCES = {"focal_smooth_l1": MMDET_V1, "focal_giou": PAP_FOCAL_GIOU, "ap_smooth_l1": ALRP_AP,
           "alrp": ALRP_A, "rank_sort": RS_ATSS, "bucketed_rank_sort": BR_BRS,
           "bucketed_ap": BR_BAP, "pap": PAP}

# Model and loss of each recipe: detector, coder stds, anchor ratios, scales per octave,
# anchors per location, assigner, delta, box loss, balance, box weight, smooth-L1 beta,
# smooth-L1 mean over the 4 coordinates.
RECIPE = {
    # MMDET_V1: target_stds 1; SmoothL1Loss beta 0.11, loss_weight 1, avg_factor #pos
    "focal_smooth_l1": ("retinanet", (1.0, 1.0, 1.0, 1.0), (0.5, 1.0, 2.0), 3, 9,
                        "max_iou", None, "smooth_l1", "fixed", 1.0, 0.11, False),
    # PAP_FOCAL_GIOU: stds 1 (base model), scales_per_octave 2; GIoULoss loss_weight 2.0
    "focal_giou": ("retinanet", (1.0, 1.0, 1.0, 1.0), (0.5, 1.0, 2.0), 2, 6,
                   "max_iou", None, "giou", "fixed", 2.0, 1.0, False),
    # ALRP_AP: stds 0.1/0.2, scales_per_octave 2; SmoothL1Loss beta 1.0 (mean); AP delta 1.0
    "ap_smooth_l1": ("retinanet", (0.1, 0.1, 0.2, 0.2), (0.5, 1.0, 2.0), 2, 6,
                     "max_iou", 1.0, "smooth_l1", "fixed", 1.0, 1.0, True),
    # ALRP_A (max-IoU config): stds 0.1/0.2, ratios 0.5/1/2, scales_per_octave 2; delta 1.0
    "alrp": ("retinanet", (0.1, 0.1, 0.2, 0.2), (0.5, 1.0, 2.0), 2, 6,
             "max_iou", 1.0, "alrp", "self_balance", 1.0, 1.0, False),
    # RS_ATSS: ratios [1.0], scales_per_octave 3, ATSSAssigner topk 9, RankSort delta 0.5
    "rank_sort": ("atss", (0.1, 0.1, 0.2, 0.2), (1.0,), 3, 3,
                  "atss", 0.5, "weighted_giou", "value_ratio", 1.0, 1.0, False),
    # BR_BRS: as RS_ATSS with BucketedRankSort
    "bucketed_rank_sort": ("atss", (0.1, 0.1, 0.2, 0.2), (1.0,), 3, 3,
                           "atss", 0.5, "weighted_giou", "value_ratio", 1.0, 1.0, False),
    # BR_BAP: as RS_ATSS; BucketedAPLoss delta 1.0 (hard-coded in the head), loc_weight 2.0
    "bucketed_ap": ("atss", (0.1, 0.1, 0.2, 0.2), (1.0,), 3, 3,
                    "atss", 1.0, "weighted_giou", "fixed", 2.0, 1.0, False),
    # PAP: stds 0.1/0.2, scales_per_octave 2; PAP is the only loss (box weight 0)
    "pap": ("retinanet", (0.1, 0.1, 0.2, 0.2), (0.5, 1.0, 2.0), 2, 6,
            "max_iou", None, "pap", "fixed", 0.0, 1.0, False),
}

# COCO config of each recipe: file, lr, reference batch = batch, epochs, decay epochs, warmup
# ratio, grad clip, NMS IoU, image size, augmentation.
COCO = {
    # MMDET_V1: lr 0.01 @ 2x8, 12 epochs, step [8, 11], warmup_ratio 1/3, grad_clip 35, nms 0.5
    "focal_smooth_l1": ("coco_retinanet_focal", 0.01, 16, 12, (8, 11), 1 / 3, 35.0, 0.5, 800,
                        "flip"),
    # PAP_FOCAL_GIOU: lr 0.016 @ 8x8, 100 epochs, [60, 80], warmup 0.001, no clip, nms 0.5
    "focal_giou": ("coco_retinanet_focal_giou", 0.016, 64, 100, (60, 80), 0.001, 0.0, 0.5, 512,
                   "ssd"),
    # ALRP_AP: lr 0.002 @ 8x4, 100 epochs, [60, 80], warmup 0.001, no clip, nms 0.5
    "ap_smooth_l1": ("coco_retinanet_ap", 0.002, 32, 100, (60, 80), 0.001, 0.0, 0.5, 512, "ssd"),
    # ALRP_A: lr 0.008 @ 8x4, 100 epochs, [60, 80], warmup 0.001, no clip, nms 0.5
    "alrp": ("coco_retinanet_alrp", 0.008, 32, 100, (60, 80), 0.001, 0.0, 0.5, 512, "ssd"),
    # RS_ATSS: lr 0.008 @ 4x4, 12 epochs, [8, 11], warmup 0.001, no clip, nms 0.6
    "rank_sort": ("coco_atss_rs", 0.008, 16, 12, (8, 11), 0.001, 0.0, 0.6, 800, "flip"),
    # BR_BRS: as RS_ATSS
    "bucketed_rank_sort": ("coco_atss_brs", 0.008, 16, 12, (8, 11), 0.001, 0.0, 0.6, 800, "flip"),
    # BR_BAP: as RS_ATSS
    "bucketed_ap": ("coco_atss_bap", 0.008, 16, 12, (8, 11), 0.001, 0.0, 0.6, 800, "flip"),
    # PAP: lr 0.016 @ 8x8, 100 epochs, [60, 80], warmup 0.001, no clip, nms iou_thr 0.6
    "pap": ("coco_retinanet_pap", 0.016, 64, 100, (60, 80), 0.001, 0.0, 0.6, 512, "ssd"),
}


def load(file_name):
  return config_lib.load_config_file(os.path.join(REPO, "configs", f"{file_name}.py"))


def test_every_recipe_is_pinned():
  assert set(RECIPE) == set(COCO) == set(SOURCES) == set(dense.LOSS_NAMES)


@pytest.mark.parametrize("name", sorted(COCO))
def test_coco_config_file_cites_its_published_config(name):
  repo, path = SOURCES[name].split(" ")[0], SOURCES[name].split(" ")[-1]
  with open(os.path.join(REPO, "configs", f"{COCO[name][0]}.py"), encoding="utf-8") as f:
    text = f.read()
  doc = ast.get_docstring(ast.parse(text))
  assert repo in doc and path in doc
  assert f"# {repo}" in text and path in text.split("def get_config")[1]
  assert "--config.data.train_images" not in doc  # usage lives in configs/__init__.py


@pytest.mark.parametrize("name", sorted(RECIPE))
def test_recipe_model_and_loss_are_published(name):
  (detector, stds, ratios, scales, per_location, assigner, delta, box_loss, balance, weight,
   beta, mean_over_coords) = RECIPE[name]
  model = dense.recipe_model_config(name)
  assert model.name == detector
  assert tuple(model.box_stds) == stds
  assert tuple(model.anchor_ratios) == ratios
  assert model.octave_base_scale == 4.0
  assert model.scales_per_octave == scales
  assert ops.num_anchors_per_location(ratios=model.anchor_ratios,
                                      scales_per_octave=model.scales_per_octave) == per_location
  recipe = dense.RECIPES[name]
  assert recipe.detector == detector
  assert recipe.box_loss == box_loss and recipe.balance == balance
  assert recipe.beta == beta and recipe.box_mean_over_coords == mean_over_coords
  resolved = dense.check_loss_config(dense.default_loss_config(name))
  assert resolved.assigner == assigner
  assert resolved.delta == delta
  if balance == "fixed":
    assert resolved.fixed_weight == weight
  else:
    assert resolved.fixed_weight is None
  if name == "alrp":
    loss = dense.default_loss_config(name)
    assert loss.alrp_initial_weight == 50.0 and loss.alrp_period == 0  # SB init 50, 1 epoch
  if name == "pap":
    assert dense.default_loss_config(name).pap_top_k == 100_000  # num_topk=1e5


@pytest.mark.parametrize("name", sorted(COCO))
def test_coco_config_is_published(name):
  (file_name, lr, batch, epochs, decay, warmup_ratio, clip, nms_iou, size,
   augment) = COCO[name]
  c = load(file_name)
  config_lib.validate(c)
  o = c.optimizer
  assert c.loss.name == name
  assert o.name == "sgd" and o.momentum == 0.9 and o.weight_decay == 1e-4
  assert o.lr == lr and o.lr_reference_batch_size == batch and c.train.batch_size == batch
  assert c.train.num_epochs == epochs and c.train.num_steps == 0
  assert o.schedule == "step" and tuple(o.decay_epochs) == decay and o.decay_factor == 0.1
  assert o.warmup_steps == 500 and o.warmup_ratio == pytest.approx(warmup_ratio, rel=1e-12)
  assert o.grad_clip_norm == clip
  assert c.eval.iou_threshold == nms_iou
  assert c.eval.score_threshold == 0.05 and c.eval.pre_nms_top_k == 1000
  assert c.eval.max_detections == 100
  assert c.data.image_size == size and c.data.augment == augment
  assert c.data.num_classes == 80
  assert c.model.backbone == "resnet50" and c.model.frozen_stages == 1
  assert c.train.ranking == "per_device"
  # The file's model and loss are the recipe's published ones.
  published = dense.recipe_model_config(name)
  for field in ("name", "anchor_ratios", "octave_base_scale", "scales_per_octave", "box_stds"):
    assert c.model[field] == published[field], field
  resolved = c.copy_and_resolve_references()
  assert (dense.check_loss_config(resolved.loss)
          == dense.check_loss_config(dense.default_loss_config(name)))


def test_focal_smooth_l1_warmup_starts_at_a_third():
  """mmdet v1 warmup_ratio 1/3: the first step runs at lr / 3."""
  c = load("coco_retinanet_focal")
  sched = optim.learning_rate_schedule(c.optimizer, global_batch_size=16, total_steps=1000,
                                       steps_per_epoch=100)
  assert float(sched(0)) == pytest.approx(0.01 / 3, rel=1e-5)
  assert float(sched(500)) == pytest.approx(0.01, rel=1e-6)
