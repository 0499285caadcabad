"""Configs, overrides, the optimiser and the learning-rate schedule (no training)."""

from __future__ import annotations

import ast
import glob
import math
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrank.train import config as config_lib
from jaxrank.train import optim, presets

from test_train_helpers import REPO


def _default():
  return config_lib.load_config_file(os.path.join(REPO, "configs", "default.py"))


def test_default_config_is_tiny_rs_on_synthetic():
  c = _default()
  config_lib.validate(c)
  assert c.model.backbone == "tiny"
  assert c.loss.name == "rank_sort"
  assert c.data.source == "synthetic"
  assert c.data.num_classes == 3
  assert c.model.num_classes == 3 and c.model.image_size == c.data.image_size


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                                         if not os.path.basename(p).startswith("_")))
def test_every_config_file_loads_and_validates(path):
  c = config_lib.load_config_file(path)
  config_lib.validate(c)
  from jaxrank import models

  resolved = c.copy_and_resolve_references()
  models.family_of(resolved.model).check_config(resolved.model, resolved.loss)


def test_parametrised_config_file():
  c = config_lib.load_config_file(os.path.join(REPO, "configs", "synthetic.py") + ":alrp")
  assert c.loss.name == "alrp" and c.model.name == "retinanet"
  with pytest.raises(ValueError, match="recipe must be one of .*; got 'nope'"):
    config_lib.load_config_file(os.path.join(REPO, "configs", "synthetic.py") + ":nope")
  c = config_lib.load_config_file(os.path.join(REPO, "configs", "synthetic.py")
                                  + ":cascade_rcnn_rank_sort")
  assert c.loss.name == "rank_sort" and c.model.name == "cascade_rcnn"


_PUBLISHED = {
  # file: (loss, lr, reference batch, epochs, decay epochs, warmup ratio, image size); every
  # published value is pinned in test_recipes_published.py.
  "coco_retinanet_focal": ("focal_smooth_l1", 0.01, 16, 12, (8, 11), 1 / 3, 800),
  "coco_retinanet_focal_giou": ("focal_giou", 0.016, 64, 100, (60, 80), 0.001, 512),
  "coco_retinanet_ap": ("ap_smooth_l1", 0.002, 32, 100, (60, 80), 0.001, 512),
  "coco_retinanet_alrp": ("alrp", 0.008, 32, 100, (60, 80), 0.001, 512),
  "coco_atss_rs": ("rank_sort", 0.008, 16, 12, (8, 11), 0.001, 800),
  "coco_atss_brs": ("bucketed_rank_sort", 0.008, 16, 12, (8, 11), 0.001, 800),
  "coco_atss_bap": ("bucketed_ap", 0.008, 16, 12, (8, 11), 0.001, 800),
  "coco_retinanet_pap": ("pap", 0.016, 64, 100, (60, 80), 0.001, 512),
  "coco_faster_rcnn_ce_smooth_l1": ("ce_smooth_l1", 0.04, 64, 100, (75, 95), 0.001, 512),
  "coco_faster_rcnn_ce_giou": ("ce_giou", 0.04, 64, 100, (75, 95), 0.001, 512),
  "coco_faster_rcnn_rs": ("rank_sort", 0.012, 16, 12, (8, 11), 0.001, 800),
  "coco_faster_rcnn_brs": ("bucketed_rank_sort", 0.012, 16, 12, (8, 11), 0.001, 800),
  "coco_faster_rcnn_alrp": ("alrp", 0.012, 32, 100, (75, 95), 0.001, 512),
  "coco_faster_rcnn_pap": ("pap", 0.024, 64, 100, (75, 95), 0.001, 512),
  "coco_cascade_rcnn_rs": ("rank_sort", 0.012, 16, 12, (8, 11), 0.001, 800),
  "coco_cascade_rcnn_brs": ("bucketed_rank_sort", 0.012, 16, 12, (8, 11), 0.001, 800),
}


@pytest.mark.parametrize("name", sorted(_PUBLISHED))
def test_coco_recipes_have_the_published_schedule(name):
  loss, lr, batch, epochs, decay, warmup_ratio, size = _PUBLISHED[name]
  c = config_lib.load_config_file(os.path.join(REPO, "configs", f"{name}.py"))
  assert c.name == name
  assert c.loss.name == loss
  assert c.optimizer.name == "sgd" and c.optimizer.momentum == 0.9
  assert c.optimizer.weight_decay == 1e-4
  assert c.optimizer.lr == lr and c.optimizer.lr_reference_batch_size == batch
  assert c.train.batch_size == batch and c.train.num_epochs == epochs
  assert tuple(c.optimizer.decay_epochs) == decay and c.optimizer.schedule == "step"
  assert c.optimizer.warmup_steps == 500
  assert c.optimizer.warmup_ratio == pytest.approx(warmup_ratio, rel=1e-12)
  assert c.data.image_size == size and c.data.num_classes == 80
  assert c.model.backbone == "resnet50"
  assert c.train.ranking == "per_device"
  if name.startswith("coco_atss"):
    assert c.model.name == "atss" and tuple(c.model.anchor_ratios) == (1.0,)
    assert c.model.scales_per_octave == 3
  # Linear scaling rule: doubling the batch doubles the rate.
  assert optim.peak_learning_rate(c.optimizer, 2 * batch) == pytest.approx(2 * lr)
  assert optim.peak_learning_rate(c.optimizer, batch // 2) == pytest.approx(lr / 2)


def test_coco_configs_start_from_the_shared_base():
  """Only the recipe's own fields differ from presets.coco_base()."""
  recipe_fields = {
    "name", "model.name", "model.image_size", "model.anchor_ratios", "model.scales_per_octave",
    "model.box_stds",
    "loss.name", "loss.assigner", "loss.delta", "loss.box_loss_weight", "data.image_size",
    "data.augment", "optimizer.lr", "optimizer.lr_reference_batch_size",
    "optimizer.warmup_ratio", "optimizer.decay_epochs", "optimizer.grad_clip_norm",
    "train.batch_size", "train.num_epochs", "eval.iou_threshold", "eval.score_threshold",
  }
  base = config_lib.to_dict(presets.coco_base())
  for name in _PUBLISHED:
    c = config_lib.to_dict(config_lib.load_config_file(os.path.join(REPO, "configs",
                                                                    f"{name}.py")))
    # The two-stage model and loss sections are their recipe's (models.recipe_config).
    own = ("model", "loss") if c["model"]["name"] in ("faster_rcnn", "cascade_rcnn") else ()
    changed = {"name"} if c["name"] != base["name"] else set()
    changed |= {f"{section}.{key}" for section, fields in c.items()
                if isinstance(fields, dict) and section not in own
                for key in fields if fields[key] != base[section][key]}
    assert changed <= recipe_fields, (name, changed - recipe_fields)
  assert base["data"]["train_annotations"].endswith("instances_train2017.json")
  assert base["model"]["norm"] == "frozen_bn" and base["model"]["frozen_stages"] == 1


def test_config_docstrings_are_short():
  """One paragraph per file; the usage lives in configs/__init__.py."""
  for path in glob.glob(os.path.join(REPO, "configs", "*.py")):
    if os.path.basename(path).startswith("_"):
      continue
    with open(path, encoding="utf-8") as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
    assert doc, path
    assert "--config.data.train_images" not in doc, path
    assert "linear scaling rule" not in doc.lower(), path
    assert len(doc.splitlines()) <= 10, path


# -- overrides ----------------------------------------------------------------------------


def test_overrides_are_typed_like_the_field():
  c = _default()
  config_lib.apply_overrides(c, [
    ("train.num_steps", "12"), ("optimizer.lr", "3e-4"), ("train.plots", "false"),
    ("optimizer.decay_steps", "5,9"), ("data.augment", "none"), ("loss.delta", "0.25"),
    ("optimizer.decay_epochs", "(3, 4)"), ("data.image_size", "96"),
  ])
  assert c.train.num_steps == 12 and isinstance(c.train.num_steps, int)
  assert c.optimizer.lr == 3e-4
  assert c.train.plots is False
  assert tuple(c.optimizer.decay_steps) == (5, 9)
  assert tuple(c.optimizer.decay_epochs) == (3, 4)
  assert c.loss.delta == 0.25
  assert c.model.image_size == 96  # follows data.image_size


@pytest.mark.parametrize("key,value,match", [
  ("train.nope", "1", "unknown config key 'train.nope'"),
  ("nosection.x", "1", "unknown config key 'nosection.x'"),
  ("train", "1", "is a section"),
  ("train.num_steps", "ten", "'train.num_steps': expected an integer"),
  ("train.num_steps", "1.5", "'train.num_steps': expected an integer"),
  ("optimizer.lr", "fast", "'optimizer.lr': expected a number"),
  ("train.plots", "maybe", "'train.plots': expected a boolean"),
  ("optimizer.decay_steps", "a,b", "'optimizer.decay_steps'"),
])
def test_bad_override_names_the_key(key, value, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.apply_override(_default(), key, value)


@pytest.mark.parametrize("key,value,match", [
  ("train.nan_policy", "explode", "'train.nan_policy' must be one of.*got 'explode'"),
  ("optimizer.name", "lion", "'optimizer.name'"),
  ("data.source", "imagenet", "'data.source'"),
  ("train.batch_size", "0", "'train.batch_size' must be >= 1"),
  ("optimizer.lr", "-1", "'optimizer.lr'"),
  ("train.ranking", "sideways", "'train.ranking'"),
  ("model.backbone", "resnet9", "model.backbone' must be one of"),
  ("loss.name", "hinge", "loss.name' must be one of"),
  ("loss.delta", "-1.0", "loss.delta' must be"),
])
def test_invalid_values_are_rejected_by_validate(key, value, match):
  c = _default()
  config_lib.apply_override(c, key, value)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)


def test_cli_rejects_unknown_key_and_bad_value(capsys):
  from jaxrank.train.__main__ import main

  assert main(["--config.train.bogus=1"]) == 2
  err = capsys.readouterr().err
  assert "unknown config key 'train.bogus'" in err
  assert main(["--config.train.num_steps=abc"]) == 2
  assert "'train.num_steps': expected an integer" in capsys.readouterr().err
  assert main(["--config.train.nan_policy=explode"]) == 2
  assert "train.nan_policy" in capsys.readouterr().err
  assert main(["--config", "configs/does_not_exist.py"]) == 2
  assert "config file not found" in capsys.readouterr().err


def test_cli_print_config(capsys):
  from jaxrank.train.__main__ import main

  assert main(["--config.train.num_steps", "7", "--print_config"]) == 0
  out = capsys.readouterr().out
  assert "num_steps: 7" in out and "rank_sort" in out


def test_config_json_round_trip():
  c = _default()
  c2 = config_lib.from_dict(config_lib.to_dict(c.copy_and_resolve_references()))
  config_lib.validate(c2)
  assert config_lib.to_dict(c2) == config_lib.to_dict(c.copy_and_resolve_references())


# -- optimiser and schedule ---------------------------------------------------------------


def _opt(**fields):
  c = config_lib.base_config().optimizer
  for k, v in fields.items():
    c[k] = v
  return c


def test_warmup_then_step_decay_follows_mmdet():
  o = _opt(lr=0.01, warmup_steps=500, warmup_ratio=0.001, schedule="step", decay_epochs=(8, 11))
  sched = optim.learning_rate_schedule(o, global_batch_size=16, total_steps=1200,
                                       steps_per_epoch=100)
  assert float(sched(0)) == pytest.approx(0.01 * 0.001, rel=1e-4)
  assert float(sched(250)) == pytest.approx(0.01 * (1 - 0.999 * 0.5), rel=1e-5)
  assert float(sched(500)) == pytest.approx(0.01)
  assert float(sched(799)) == pytest.approx(0.01)
  assert float(sched(800)) == pytest.approx(0.001, rel=1e-5)
  assert float(sched(1100)) == pytest.approx(0.0001, rel=1e-5)


def test_cosine_and_constant_schedules():
  o = _opt(lr=1.0, warmup_steps=10, warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.0)
  sched = optim.learning_rate_schedule(o, global_batch_size=1, total_steps=110, steps_per_epoch=1)
  assert float(sched(0)) == pytest.approx(0.1, rel=1e-5)
  assert float(sched(10)) == pytest.approx(1.0)
  assert float(sched(60)) == pytest.approx(0.5, abs=1e-6)
  assert float(sched(110)) == pytest.approx(0.0, abs=1e-6)
  o = _opt(lr=0.5, warmup_steps=0, schedule="constant")
  sched = optim.learning_rate_schedule(o, global_batch_size=1, total_steps=10, steps_per_epoch=1)
  assert float(sched(0)) == float(sched(9)) == 0.5


def test_sgd_weight_decay_matches_torch():
  """torch.optim.SGD: g += wd * p; buf = m * buf + g; p -= lr * buf."""
  o = _opt(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.01, warmup_steps=0,
           schedule="constant")
  tx, _ = optim.build_optimizer(o, global_batch_size=1, total_steps=10, steps_per_epoch=1)
  p = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(p)
  buf = np.zeros(2)
  pn = np.array([1.0, -2.0])
  for g in ([0.5, 0.5], [-1.0, 0.25]):
    upd, state = tx.update({"w": jnp.array(g)}, state, p)
    p = optax.apply_updates(p, upd)
    buf = 0.9 * buf + (np.array(g) + 0.01 * pn)
    pn = pn - 0.1 * buf
    np.testing.assert_allclose(p["w"], pn, rtol=1e-6)


def test_grad_clipping_and_adamw():
  o = _opt(name="adamw", lr=0.1, warmup_steps=0, schedule="constant", grad_clip_norm=1.0,
           weight_decay=0.0)
  tx, _ = optim.build_optimizer(o, global_batch_size=1, total_steps=10, steps_per_epoch=1)
  p = {"w": jnp.zeros(3)}
  upd, _ = tx.update({"w": jnp.array([300.0, 400.0, 0.0])}, tx.init(p), p)
  assert np.all(np.isfinite(np.asarray(upd["w"])))
  # Adam's first step is lr * sign(g) whatever the clipping.
  np.testing.assert_allclose(upd["w"][:2], [-0.1, -0.1], rtol=1e-4)


def test_linear_scaling_rule():
  o = _opt(lr=0.008, lr_reference_batch_size=16)
  assert optim.peak_learning_rate(o, 16) == pytest.approx(0.008)
  assert optim.peak_learning_rate(o, 64) == pytest.approx(0.032)
  o = _opt(lr=0.008, lr_reference_batch_size=0)
  assert optim.peak_learning_rate(o, 64) == pytest.approx(0.008)


def test_presets_cover_every_recipe():
  from jaxrank.models.dense import LOSS_NAMES

  for name in LOSS_NAMES:
    assert os.path.isfile(os.path.join(REPO, "configs", f"synthetic_{name}.py"))
    c = presets.synthetic_config(name)
    config_lib.validate(c)
  # The SGD schedules are pinned above, the AdamW Deformable DETR and Co-DETR ones in
  # tests/test_models_query_based.py and tests/test_models_co_detr.py.
  query_based = {f"deformable_detr_{k}" for k in ("focal", "rs", "brs", "pap")}
  query_based |= {"co_detr_focal", "rs_detr", "brs_detr"}
  assert set(presets.COCO_RECIPES) == {k[len("coco_"):] for k in _PUBLISHED} | query_based
  files = glob.glob(os.path.join(REPO, "configs", "coco_*.py"))
  assert {os.path.basename(f)[len("coco_"):-len(".py")] for f in files} == set(
      presets.COCO_RECIPES)
  for recipe in presets.COCO_RECIPES:
    c = presets.coco_config(recipe)
    assert c.name == f"coco_{recipe}" and math.isfinite(c.optimizer.lr)
  with pytest.raises(ValueError, match="unknown COCO recipe"):
    presets.coco_config("retinanet_yolo")
