"""Co-DETR / RS-DETR / BRS-DETR: configs, auxiliary heads, positive queries, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrank import models, ops
from jaxrank.models import query_based
from jaxrank.models.query_based import co_detr, recipes
from jaxrank.train import optim
from jaxrank.validation import ConfigError

from detector_helpers import SIZE, loss_and_grads, make_batch
from test_train_helpers import jax_cache, load_state, tiny_config  # noqa: F401

CO_RECIPES = ("co_detr_focal", "rs_detr", "brs_detr")


def tiny(recipe, **model_updates):
  model, loss = models.recipe_config(recipe)
  model.update(backbone="tiny", norm="group_norm", frozen_stages=-1, image_size=SIZE,
               num_classes=3, hidden_dim=16, num_heads=2, num_points=2, encoder_layers=1,
               decoder_layers=2, ffn_dim=32, num_queries=10, aux_queries=12,
               rpn_anchor_scale=2.0, rpn_train_pre_nms=200, rpn_train_post_nms=40,
               roi_sampling_ratio=1, fc_channels=32, atss_anchor_scale=2.0)
  model.update(model_updates)
  return model, loss


def test_recipes_are_registered_with_the_published_settings():
  assert set(CO_RECIPES) <= set(models.recipe_names())
  assert query_based.RECIPE_NAMES[-3:] == CO_RECIPES
  for recipe in CO_RECIPES:
    model, loss = models.recipe_config(recipe)
    models.check_config(model, loss)
    assert models.family_of(model) is query_based.FAMILY
  model = query_based.default_model_config("co_deformable_detr")
  assert (model.hidden_dim, model.num_levels, model.encoder_layers, model.decoder_layers,
          model.ffn_dim, model.dropout, model.num_queries) == (256, 4, 6, 6, 2048, 0.0, 300)
  assert model.box_refine and model.two_stage and model.mixed_selection
  assert model.look_forward_twice and tuple(model.aux_heads) == ("rpn_roi", "atss")
  assert (model.aux_queries, model.rpn_anchor_scale, model.rpn_scales_per_octave,
          model.rpn_train_pre_nms, model.rpn_train_post_nms, model.rpn_nms_iou) == (
              300, 4.0, 3, 4000, 1000, 0.7)
  assert (model.roi_output_size, model.finest_scale, model.fc_channels,
          model.atss_anchor_scale) == (7, 112.0, 1024, 8.0)
  static = query_based.check_model_config(model)
  assert static.aux.strides == (8, 16, 32, 64, 128) and static.aux.roi_strides[-1] == 64
  assert static.aux.rpn_anchors_per_location == 9
  focal = query_based.co_detr_loss_settings(
      query_based.check_loss_config(query_based.default_loss_config("focal")))
  assert (focal.aux_weight, focal.aux_rpn_weight, focal.aux_query_weight) == (12.0, 1.0, 1.0)
  assert focal.match_costs == (2.0, 5.0, 2.0)
  brs = query_based.co_detr_loss_settings(
      query_based.check_loss_config(query_based.default_loss_config("bucketed_rank_sort")))
  assert (brs.aux_weight, brs.aux_rpn_weight, brs.aux_query_weight) == (5.0, 0.2, 1.0)
  assert brs.match_costs == (4.0, 5.0, 2.0) and brs.cls_weight == 2.0
  aux = co_detr.aux_head_settings(brs)
  assert aux.recipe.loss == "bucketed_rank_sort" and aux.rcnn_sampler == "all"
  assert aux.rpn_sampler == "all" and aux.rpn_weight == 0.2 and aux.delta == 0.5
  aux = co_detr.aux_head_settings(focal)
  assert aux.classifier == "softmax" and aux.rcnn_sampler == "random"
  assert aux.recipe.rcnn_box_loss == "giou" and aux.recipe.rcnn_box_weight == 10.0


@pytest.mark.parametrize("field,value,match", [
    ("aux_heads", ("rpn_roi", "fcos"), "model.aux_heads"),
    ("aux_heads", (), "model.aux_heads"),
    ("aux_queries", 0, "model.aux_queries"),
    ("rpn_nms_iou", 0.0, "model.rpn_nms_iou"),
    ("box_refine", False, "model.box_refine"),
    ("atss_anchor_scale", -1.0, "model.atss_anchor_scale"),
])
def test_model_config_errors_name_the_field(field, value, match):
  model, loss = models.recipe_config("brs_detr")
  model[field] = value
  with pytest.raises(ConfigError, match=match):
    models.check_config(model, loss)


def test_loss_config_errors():
  model, loss = models.recipe_config("brs_detr")
  loss.name = "pap"
  with pytest.raises(ConfigError, match="loss.name"):
    models.check_config(model, loss)
  model, loss = models.recipe_config("detr_bucketed_rank_sort")
  loss.aux_weight = 3.0
  with pytest.raises(ConfigError, match="loss.aux_weight"):
    models.check_config(model, loss)
  with pytest.raises(ConfigError, match="loss.aux_weight"):
    models.build_detector(model, loss, rngs=nnx.Rngs(0))
  model = query_based.default_model_config("deformable_detr")
  model.mixed_selection = True
  with pytest.raises(ConfigError, match="model.mixed_selection"):
    query_based.check_model_config(model)


def test_select_queries_takes_positives_first_then_random_negatives():
  positive = np.zeros((2, 30), bool)
  positive[0, [3, 7, 11]] = True
  positive[1, :25] = True
  valid = np.ones((2, 30), bool)
  valid[0, 20:] = False
  candidates = {"positive": jnp.asarray(positive), "valid": jnp.asarray(valid),
                "index": jnp.broadcast_to(jnp.arange(30), (2, 30))}
  chosen = co_detr.select_queries(jax.random.key(0), candidates, 10)
  index = np.asarray(chosen["index"])
  assert sorted(index[0, :3]) == [3, 7, 11]
  assert not np.asarray(chosen["positive"])[0, 3:].any()
  assert np.asarray(chosen["valid"]).all() and (index[0] < 20).all()
  assert len(set(index[0])) == 10
  assert np.asarray(chosen["positive"])[1].all() and (index[1] < 25).all()
  other = co_detr.select_queries(jax.random.key(1), candidates, 10)
  assert not np.array_equal(np.asarray(other["index"])[1], index[1])
  # More slots than candidates: the rest are invalid padding.
  small = jax.tree.map(lambda x: x[:, :4], candidates)
  chosen = co_detr.select_queries(jax.random.key(0), small, 6)
  assert np.asarray(chosen["valid"]).sum(axis=1).tolist() == [4, 4]


def test_centerness_targets():
  anchors = jnp.asarray([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0]])
  target = jnp.asarray([[0.0, 0.0, 20.0, 10.0], [0.0, 0.0, 20.0, 10.0]])
  # Centres (5, 5) and (15, 5) in a 20 x 10 box: l/r = 5/15, t/b = 1.
  np.testing.assert_allclose(co_detr.centerness_targets(anchors, target),
                             [np.sqrt(1 / 3), np.sqrt(1 / 3)], rtol=1e-6)


def test_assigned_focal_loss_matches_a_numpy_reference():
  rng = np.random.default_rng(3)
  b, q, k = 2, 6, 3
  logits = rng.normal(size=(b, q, k)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.3, 0.6, (b, q, 2)), rng.uniform(0.1, 0.3, (b, q, 2))],
                         -1).astype(np.float32)
  xy = rng.uniform(0, 0.5, (b, q, 2))
  targets = np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (b, q, 2))], -1).astype(np.float32)
  labels = rng.integers(0, k, (b, q))
  positive = rng.uniform(size=(b, q)) < 0.5
  where = np.ones((b, q), bool)
  where[1, -1] = False
  settings = query_based.check_loss_config(query_based.default_loss_config("focal"))
  num = float(max((positive & where).sum(), 1))
  loss, _ = recipes.assigned_loss(settings, logits, boxes, jnp.asarray(positive), targets,
                                  jnp.asarray(labels), jnp.asarray(where), num,
                                  max_positives_per_image=q)
  pos = positive & where
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  onehot = (labels[..., None] == np.arange(k)) & pos[..., None]
  pt = np.where(onehot, p, 1 - p)
  at = np.where(onehot, 0.25, 0.75)
  focal = np.sum((at * (1 - pt) ** 2 * -np.log(pt)) * where[..., None])
  pred_xyxy = np.asarray(ops.box_cxcywh_to_xyxy(boxes), np.float64)
  t_cxcywh = np.asarray(ops.box_xyxy_to_cxcywh(targets), np.float64)
  l1 = np.sum(np.abs(boxes - t_cxcywh).sum(-1) * pos)
  giou = np.asarray(ops.aligned_giou(pred_xyxy.astype(np.float32), targets), np.float64)
  giou_loss = np.sum((1 - giou) * pos)
  np.testing.assert_allclose(float(loss), (2 * focal + 5 * l1 + 2 * giou_loss) / num,
                             rtol=2e-5)


def test_positive_queries_embed_boxes_features_and_head():
  model, loss = tiny("brs_detr")
  detector = models.build_detector(model, loss, rngs=nnx.Rngs(0))
  assert detector.head_pos_embed.shape == (2, 16)
  chosen = {"boxes": jnp.asarray([[[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 80.0, 64.0]]]),
            "features": jnp.ones((1, 2, 16))}
  tgt, query_pos, reference = detector.positive_queries(0, chosen)
  assert tgt.shape == query_pos.shape == (1, 2, 16)
  np.testing.assert_allclose(reference[0, 0], [0.25, 0.25, 0.5, 0.5])
  other_tgt, other_pos, _ = detector.positive_queries(1, chosen)
  assert not np.allclose(query_pos, other_pos) and not np.allclose(tgt, other_tgt)
  maps = detector.encoder_maps(jnp.zeros((1, 64 + 16 + 4 + 1, 16)))
  assert [m.shape[1:3] for m in maps] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]


def test_detect_uses_the_query_head():
  model, loss = tiny("brs_detr")
  detector = models.build_detector(model, loss, rngs=nnx.Rngs(0))
  det = detector.detect(make_batch()["image"], max_detections=20, score_threshold=0.0)
  assert det.boxes.shape == (2, 20, 4) and bool(jnp.all(det.valid))


@pytest.mark.slow  # ~2 min each (compiles a whole Co-DETR step)
@pytest.mark.parametrize("recipe", ["brs_detr", "co_detr_focal", "rs_detr"])
def test_every_recipe_gives_finite_losses_and_gradients(recipe):
  model, loss = tiny(recipe)
  value, metrics, state, grads = loss_and_grads(model, loss, make_batch((3, 2)))
  assert np.isfinite(value) and int(state.count) == 1
  for name in ("rpn_loss", "roi_loss", "atss_loss", "positive_query_loss", "enc_loss"):
    assert np.isfinite(metrics[name]) and metrics[name] > 0, name
  assert metrics["positive_query_num_positives"] > 0 and metrics["atss_num_positives"] > 0
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms))
  params = nnx.state(models.build_detector(model, loss, rngs=nnx.Rngs(0)), nnx.Param)
  for name in ("rpn", "roi_head", "atss", "aux_pos_trans", "pos_feats_trans", "head_pos_embed",
               "downsample", "query_embed"):
    assert name in params, name
  grad_norm = {k: float(optax.tree.norm(v)) for k, v in grads.items()}
  for name in ("rpn", "roi_head", "atss", "aux_pos_trans", "pos_feats_trans", "head_pos_embed"):
    assert grad_norm[name] > 0, name


@pytest.mark.slow
def test_padding_examples_and_images_without_boxes():
  model, loss = tiny("brs_detr")
  full = make_batch((3, 2))
  padded = dict(full, valid=jnp.asarray([True, False]))
  alone = {k: v[:1] for k, v in full.items()}
  a = loss_and_grads(model, loss, padded)[0]
  b = loss_and_grads(model, loss, alone)[0]
  np.testing.assert_allclose(a, b, rtol=1e-4)
  empty = make_batch((0, 1))
  value, metrics, _, _ = loss_and_grads(model, loss, empty)
  assert np.isfinite(value)


@pytest.mark.slow
def test_one_auxiliary_head():
  for heads in (("atss",), ("rpn_roi",)):
    model, loss = tiny("co_detr_focal", aux_heads=heads)
    value, metrics, _, _ = loss_and_grads(model, loss, make_batch())
    assert np.isfinite(value)
    assert ("atss_loss" in metrics) == ("atss" in heads)
    assert ("rpn_loss" in metrics) == ("rpn_roi" in heads)


def test_lr_multipliers_and_coco_configs():
  from jaxrank.train import config as config_lib
  from jaxrank.train import presets

  for name, recipe in (("co_detr_focal", "co_detr_focal"), ("rs_detr", "rs_detr"),
                       ("brs_detr", "brs_detr")):
    c = presets.coco_config(name)
    config_lib.validate(c)
    model, loss = models.recipe_config(recipe)
    assert query_based.check_model_config(c.model.copy_and_resolve_references()) == (
        query_based.check_model_config(model.copy_and_resolve_references()))
    settings = query_based.co_detr_loss_settings(query_based.check_loss_config(c.loss))
    assert settings == query_based.co_detr_loss_settings(query_based.check_loss_config(loss))
    assert c.optimizer.name == "adamw" and c.optimizer.lr == 2e-4
    assert c.optimizer.lr_reference_batch_size == 16 and c.train.batch_size == 16
    assert c.optimizer.weight_decay == 1e-4 and c.optimizer.grad_clip_norm == 0.1
    assert dict(c.optimizer.lr_multipliers) == {"backbone": 0.1, "sampling_offsets": 0.1,
                                                "reference_points": 0.1}
    assert c.train.num_epochs == 12 and c.optimizer.schedule == "step"
    decay = (11,) if recipe == "co_detr_focal" else (10, 11)
    factor = 0.1 if recipe == "co_detr_focal" else 0.2
    assert tuple(c.optimizer.decay_epochs) == decay and c.optimizer.decay_factor == factor
    tx, _ = optim.build_optimizer(c.optimizer, global_batch_size=c.train.batch_size,
                                  total_steps=10, steps_per_epoch=5)
    assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.slow
def test_trains_resumes_and_predicts_through_the_trainer(tmp_path, jax_cache):
  import jaxrank
  from jaxrank.train import trainer

  workdir = str(tmp_path / "run")
  config = tiny_config("brs_detr", train__num_steps=2, train__checkpoint_every=2)
  result = trainer.train(config, workdir)
  assert result.step == 2 and "AP" in result.metrics
  saved = load_state(workdir, 2)
  counts = [v for k, v in saved.items() if "loss_state" in k and "count" in k]
  assert [int(np.asarray(c)) for c in counts] == [2], list(saved)
  detector = jaxrank.load_detector(workdir)
  image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
  out = detector.predict(image, score_threshold=0.0)
  assert out["boxes"].shape[1] == 4 and len(out["boxes"]) == len(out["scores"])
