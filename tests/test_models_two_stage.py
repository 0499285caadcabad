"""The two-stage family (Faster R-CNN, Cascade R-CNN): configs, losses, states, detection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrank import losses, models
from jaxrank.models import two_stage
from jaxrank.validation import ConfigError

from detector_helpers import SIZE, loss_and_grads, make_batch
from test_train_helpers import jax_cache, load_state, tiny_config  # noqa: F401


def tiny(recipe, **model_updates):
  model, loss = models.recipe_config(recipe)
  model.update(backbone="tiny", norm="group_norm", frozen_stages=-1, image_size=SIZE,
               num_classes=3, fpn_channels=16, rpn_channels=16, fc_channels=32,
               anchor_scale=4.0, rpn_train_pre_nms=100, rpn_train_post_nms=32,
               rpn_test_pre_nms=100, rpn_test_post_nms=32, finest_scale=28.0)
  model.update(model_updates)
  loss.update(rpn_num_samples=32, rcnn_num_samples=24, alrp_period=4, pap_top_k=500)
  return model, loss


def test_every_recipe_is_registered_and_valid():
  assert set(two_stage.RECIPE_NAMES) <= set(models.recipe_names())
  assert set(two_stage.RECIPE_NAMES) == {
      "faster_rcnn_ce_smooth_l1", "faster_rcnn_ce_giou", "faster_rcnn_rank_sort",
      "faster_rcnn_bucketed_rank_sort", "faster_rcnn_alrp", "faster_rcnn_pap",
      "cascade_rcnn_rank_sort", "cascade_rcnn_bucketed_rank_sort"}
  for recipe in two_stage.RECIPE_NAMES:
    model, loss = models.recipe_config(recipe)
    models.check_config(model, loss)
    assert models.family_of(model) is two_stage.FAMILY


def test_published_settings():
  model, loss = models.recipe_config("cascade_rcnn_rank_sort")
  assert tuple(model.stage_iou_thresholds) == (0.5, 0.6, 0.7)
  assert tuple(model.stage_loss_weights) == (1.0, 1.0, 1.0)
  assert [tuple(s) for s in model.stage_box_stds] == [(0.1, 0.1, 0.2, 0.2)] * 3
  assert model.class_agnostic and model.rpn_allowed_border == 0.0
  settings = two_stage.check_loss_config(loss)
  assert settings.rpn_weight == 0.2 and settings.delta == 0.5
  assert (settings.rpn_sampler, settings.rcnn_sampler) == ("all", "all_with_gt")
  model, loss = models.recipe_config("faster_rcnn_ce_giou")
  assert tuple(model.rpn_box_stds) == (1.0, 1.0, 1.0, 1.0) and not model.class_agnostic
  settings = two_stage.check_loss_config(loss)
  assert settings.classifier == "softmax" and settings.rcnn_samples == (512, 0.25)
  assert settings.recipe.rcnn_box_weight == 10.0
  settings = two_stage.check_loss_config(models.recipe_config("faster_rcnn_pap")[1])
  assert (settings.rpn_sampler, settings.rcnn_sampler) == ("random", "all")
  settings = two_stage.check_loss_config(models.recipe_config("faster_rcnn_alrp")[1])
  assert settings.rpn_weight == 0.2 and settings.recipe.rpn_error_scale == pytest.approx(1 / 0.6)


@pytest.mark.parametrize("field,value,match", [
    ("name", "mask_rcnn", "model.name"),
    ("stage_iou_thresholds", (0.5, 0.6), "model.stage_iou_thresholds"),
    ("stage_box_stds", ((0.1, 0.1, 0.2, 0.2),) * 2, "model.stage_box_stds"),
    ("roi_sampling_ratio", 0, "model.roi_sampling_ratio"),
    ("rpn_nms_iou", 1.5, "model.rpn_nms_iou"),
])
def test_model_config_errors_name_the_field(field, value, match):
  model, loss = models.recipe_config("faster_rcnn_rank_sort")
  model[field] = value
  with pytest.raises(ConfigError, match=match):
    models.check_config(model, loss)


@pytest.mark.parametrize("field,value,match", [
    ("name", "focal", "loss.name"),
    ("rcnn_sampler", "ohem", "loss.rcnn_sampler"),
    ("rcnn_pos_fraction", 1.5, "loss.rcnn_pos_fraction"),
    ("pap_theta", (0.5,) * 41, "loss.pap_theta"),
])
def test_loss_config_errors_name_the_field(field, value, match):
  model, loss = models.recipe_config("faster_rcnn_pap")
  loss[field] = value
  with pytest.raises(ConfigError, match=match):
    models.check_config(model, loss)


def test_cascade_stage_weights_must_match_stages():
  model, loss = models.recipe_config("cascade_rcnn_rank_sort")
  model.stage_loss_weights = (1.0, 1.0)
  with pytest.raises(ConfigError, match="model.stage_loss_weights"):
    models.check_config(model, loss)


# The bucketed and GIoU twins share every code path but the loss function, and the default
# suite's overfit test trains faster_rcnn_rank_sort: slow tests.
TWINS = ("faster_rcnn_ce_giou", "faster_rcnn_bucketed_rank_sort", "faster_rcnn_rank_sort",
         "cascade_rcnn_bucketed_rank_sort")


@pytest.mark.parametrize("recipe", [
    pytest.param(r, marks=pytest.mark.slow if r in TWINS or r == "cascade_rcnn_rank_sort" else ())
    for r in two_stage.RECIPE_NAMES])
def test_every_recipe_gives_finite_losses_and_gradients(recipe):
  model_config, loss_config = tiny(recipe)
  loss, metrics, new_state, grads = loss_and_grads(model_config, loss_config, make_batch())
  assert np.isfinite(loss) and loss > 0
  for k, v in metrics.items():
    assert np.isfinite(v), k
  assert metrics["num_positives"] > 0 and metrics["rpn_num_positives"] > 0
  stages = len(model_config.stage_iou_thresholds)
  assert {f"s{k}_cls_loss" for k in range(stages)} <= set(metrics)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
  settings = two_stage.check_loss_config(loss_config)
  if settings.random:
    assert int(new_state.count) == 1


def test_images_without_boxes_give_finite_zero_gradient_ranking_terms():
  model_config, loss_config = tiny("faster_rcnn_rank_sort")
  loss, metrics, _, grads = loss_and_grads(model_config, loss_config, make_batch((0, 0)))
  assert np.isfinite(loss)
  assert metrics["num_positives"] == 0 and metrics["rpn_num_positives"] == 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_padding_examples_contribute_nothing():
  model_config, loss_config = tiny("faster_rcnn_rank_sort")
  batch = make_batch((3, 2))
  one = jax.tree.map(lambda x: x[:1], batch)
  padded = dict(batch, valid=jnp.asarray([True, False]))
  loss_one, metrics_one, _, _ = loss_and_grads(model_config, loss_config, one)
  loss_padded, metrics_padded, _, _ = loss_and_grads(model_config, loss_config, padded)
  assert metrics_one["num_positives"] == metrics_padded["num_positives"]
  assert loss_one == pytest.approx(loss_padded, rel=1e-5)


def test_random_sampler_is_deterministic_per_count():
  model_config, loss_config = tiny("faster_rcnn_ce_giou")
  batch = make_batch()
  state = two_stage.SamplerState(jnp.asarray(5, jnp.int32))
  a = loss_and_grads(model_config, loss_config, batch, state)[0]
  b = loss_and_grads(model_config, loss_config, batch, state)[0]
  c = loss_and_grads(model_config, loss_config, batch,
                     two_stage.SamplerState(jnp.asarray(6, jnp.int32)))[0]
  assert a == b and a != c


def test_pap_gradient_scales_reach_each_box_branch():
  model_config, loss_config = tiny("faster_rcnn_pap")
  batch = make_batch()
  state = models.init_loss_state(model_config, loss_config)
  assert isinstance(state, two_stage.PAPState)
  unit = state._replace(rpn=state.rpn._replace(grad_scale=jnp.float32(1.0)),
                        rcnn=state.rcnn._replace(grad_scale=jnp.float32(1.0)))
  double = unit._replace(rpn=unit.rpn._replace(grad_scale=jnp.float32(2.0)),
                         rcnn=unit.rcnn._replace(grad_scale=jnp.float32(3.0)))
  la, _, _, ga = loss_and_grads(model_config, loss_config, batch, unit)
  lb, _, _, gb = loss_and_grads(model_config, loss_config, batch, double)
  assert la == lb
  np.testing.assert_allclose(gb["rpn"]["reg"]["kernel"][...], 2 * ga["rpn"]["reg"]["kernel"][...],
                             rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(gb["stages"][0]["reg"]["kernel"][...],
                             3 * ga["stages"][0]["reg"]["kernel"][...], rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(gb["stages"][0]["cls"]["kernel"][...],
                             ga["stages"][0]["cls"]["kernel"][...], rtol=1e-5, atol=1e-9)


def test_alrp_state_updates_once_per_period():
  model_config, loss_config = tiny("faster_rcnn_alrp")
  state = models.init_loss_state(model_config, loss_config)
  assert isinstance(state, two_stage.AlrpState)
  _, metrics, new_state, _ = loss_and_grads(model_config, loss_config, make_batch(), state)
  assert metrics["rpn_alrp_weight"] == 50.0 and metrics["rcnn_alrp_weight"] == 50.0
  assert int(new_state.rpn.count) == 1 and int(new_state.rcnn.count) == 1


def test_ranking_groups_must_divide_the_batch():
  model_config, loss_config = tiny("faster_rcnn_rank_sort")
  loss_config.ranking_groups = 3
  with pytest.raises(ValueError, match="ranking_groups"):
    loss_and_grads(model_config, loss_config, make_batch())


@pytest.mark.parametrize("recipe", ["faster_rcnn_ce_smooth_l1", "cascade_rcnn_rank_sort"])
def test_detect_gives_padded_clipped_detections(recipe):
  model_config, loss_config = tiny(recipe)
  detector = models.build_detector(model_config, loss_config, rngs=nnx.Rngs(0))
  images = make_batch()["image"]
  dets = nnx.jit(lambda m, x: m.detect(x, score_threshold=0.0, max_detections=20))(
      detector, images)
  assert dets.boxes.shape == (2, 20, 4) and dets.valid.shape == (2, 20)
  assert bool(jnp.all(dets.valid))
  boxes = np.asarray(dets.boxes)
  assert boxes.min() >= 0 and boxes.max() <= SIZE
  assert np.all(np.diff(np.asarray(dets.scores), axis=1) <= 1e-6)
  assert int(jnp.max(dets.classes)) < 3


def test_proposals_are_per_level_nms_of_decoded_rpn_boxes():
  model_config, loss_config = tiny("faster_rcnn_rank_sort")
  detector = models.build_detector(model_config, loss_config, rngs=nnx.Rngs(0))
  features = detector.features(make_batch()["image"])
  logits, deltas = detector.rpn(features)
  props = detector.proposals(logits, deltas, training=True)
  assert props.boxes.shape == (2, 32, 4)
  assert bool(jnp.all(props.valid))
  assert float(jnp.min(props.boxes)) >= 0 and float(jnp.max(props.boxes)) <= SIZE
  static = detector.static_info()
  assert logits.shape == (2, static.anchors.shape[0])
  assert static.strides == (4, 8, 16, 32, 64)


def test_roi_features_come_from_the_level_of_each_box():
  model_config, loss_config = tiny("faster_rcnn_rank_sort")
  detector = models.build_detector(model_config, loss_config, rngs=nnx.Rngs(0))
  features = detector.features(make_batch()["image"])
  boxes = jnp.asarray([[[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 60.0, 60.0]]] * 2)
  pooled = detector.roi_features(features, boxes)
  assert pooled.shape == (2, 2, 7, 7, 16)
  from jaxrank.ops import roi_align
  small = roi_align(features[0][0], boxes[0, :1], spatial_scale=1 / 4)  # scale 20 < 28: P2
  large = roi_align(features[1][0], boxes[0, 1:], spatial_scale=1 / 8)  # scale 60: P3
  np.testing.assert_allclose(pooled[0, 0], small[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled[0, 1], large[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_loss_is_float32_for_bfloat16_models():
  model_config, loss_config = tiny("faster_rcnn_bucketed_rank_sort", dtype="bfloat16")
  loss, metrics, _, grads = loss_and_grads(model_config, loss_config, make_batch())
  assert np.isfinite(loss)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_pap_theta_replaces_the_presets():
  model_config, loss_config = tiny("faster_rcnn_pap")
  loss_config.pap_theta = tuple([0.5] * two_stage.config.NUM_PAP_THETA)
  state = models.init_loss_state(model_config, loss_config)
  expected = losses.faster_rcnn_params_from_theta(jnp.full((82,), 0.5))
  np.testing.assert_allclose(state.rpn.grad_scale, expected[0].grad_scale)
  np.testing.assert_allclose(state.rcnn.h2, expected[1].h2)


@pytest.mark.slow  # ~40 s
def test_trains_resumes_and_predicts_through_the_trainer(tmp_path, jax_cache):
  """A two-stage run goes through the trainer (checkpoint with the sampler counter, COCO
  evaluation) and loads for inference, like the one-stage family."""
  import jaxrank
  from jaxrank.train import trainer

  workdir = str(tmp_path / "run")
  config = tiny_config("faster_rcnn_ce_giou", train__num_steps=2, train__checkpoint_every=2)
  result = trainer.train(config, workdir)
  assert result.step == 2 and "AP" in result.metrics
  saved = load_state(workdir, 2)
  counts = [v for k, v in saved.items() if "loss_state" in k and "count" in k]
  assert [int(np.asarray(c)) for c in counts] == [2], list(saved)
  detector = jaxrank.load_detector(workdir)
  image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
  out = detector.predict(image, score_threshold=0.0)
  assert out["boxes"].shape[1] == 4 and len(out["boxes"]) == len(out["scores"])
  assert out["boxes"][:, 2].max() <= 70 and out["boxes"][:, 3].max() <= 50


@pytest.mark.parametrize("name,recipe,sampler,score", [
    ("coco_faster_rcnn_ce_smooth_l1", "faster_rcnn_ce_smooth_l1", "random", 0.05),
    ("coco_faster_rcnn_ce_giou", "faster_rcnn_ce_giou", "random", 0.05),
    ("coco_faster_rcnn_rs", "faster_rcnn_rank_sort", "all_with_gt", 0.4),
    ("coco_faster_rcnn_brs", "faster_rcnn_bucketed_rank_sort", "all_with_gt", 0.4),
    ("coco_faster_rcnn_alrp", "faster_rcnn_alrp", "all", 0.05),
    ("coco_faster_rcnn_pap", "faster_rcnn_pap", "all", 0.05),
    ("coco_cascade_rcnn_rs", "cascade_rcnn_rank_sort", "all_with_gt", 0.4),
    ("coco_cascade_rcnn_brs", "cascade_rcnn_bucketed_rank_sort", "all_with_gt", 0.4),
])
def test_coco_configs_are_the_published_recipes(name, recipe, sampler, score):
  from jaxrank.train import presets

  c = presets.coco_config(name[len("coco_"):]).copy_and_resolve_references()
  model, loss = models.recipe_config(recipe)
  for field in ("name", "anchor_ratios", "anchor_scale", "rpn_box_stds", "rpn_allowed_border",
                "rpn_train_pre_nms", "rpn_train_post_nms", "rpn_test_pre_nms",
                "rpn_test_post_nms", "rpn_nms_iou", "roi_output_size", "finest_scale",
                "fc_channels", "stage_iou_thresholds", "stage_loss_weights", "stage_box_stds",
                "class_agnostic"):
    assert c.model[field] == model[field], field
  assert (c.model.rpn_train_pre_nms, c.model.rpn_train_post_nms) == (2000, 1000)
  assert two_stage.check_loss_config(c.loss) == two_stage.check_loss_config(loss)
  assert two_stage.check_loss_config(c.loss).rcnn_sampler == sampler
  assert c.eval.score_threshold == score and c.eval.iou_threshold == 0.5
  assert c.model.backbone == "resnet50" and c.train.ranking == "per_device"
