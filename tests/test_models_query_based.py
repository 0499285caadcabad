"""The query-based family (Deformable DETR): configs, set losses, matching, detection."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from flax import nnx

from jaxrank import losses, models, ops
from jaxrank.models import query_based
from jaxrank.models.query_based import recipes
from jaxrank.train import optim
from jaxrank.validation import ConfigError

from detector_helpers import SIZE, loss_and_grads, make_batch
from test_train_helpers import jax_cache, load_state, tiny_config  # noqa: F401


def tiny(recipe, **model_updates):
  model, loss = models.recipe_config(recipe)
  model.update(backbone="tiny", norm="group_norm", frozen_stages=-1, image_size=SIZE,
               num_classes=3, hidden_dim=16, num_heads=2, num_points=2, encoder_layers=1,
               decoder_layers=2, ffn_dim=32, num_queries=10, dropout=0.0)
  model.update(model_updates)
  loss.update(pap_top_k=100)
  return model, loss


def test_every_recipe_is_registered_and_valid():
  assert set(query_based.RECIPE_NAMES) <= set(models.recipe_names())
  assert query_based.RECIPE_NAMES == ("detr_focal", "detr_rank_sort",
                                      "detr_bucketed_rank_sort", "detr_pap", "co_detr_focal",
                                      "rs_detr", "brs_detr")
  for recipe in query_based.RECIPE_NAMES:
    model, loss = models.recipe_config(recipe)
    models.check_config(model, loss)
    assert models.family_of(model) is query_based.FAMILY


def test_published_settings():
  model = query_based.default_model_config()
  assert (model.hidden_dim, model.num_levels, model.num_heads, model.num_points,
          model.encoder_layers, model.decoder_layers, model.ffn_dim, model.dropout,
          model.num_queries) == (256, 4, 8, 4, 6, 6, 1024, 0.1, 300)
  focal = query_based.check_loss_config(query_based.default_loss_config("focal"))
  assert (focal.cls_weight, focal.l1_weight, focal.giou_weight) == (2.0, 5.0, 2.0)
  assert focal.match_costs == (2.0, 5.0, 2.0) and focal.focal_alpha == 0.25
  brs = query_based.check_loss_config(query_based.default_loss_config("bucketed_rank_sort"))
  assert (brs.cls_weight, brs.l1_weight, brs.giou_weight, brs.delta) == (2.0, None, None, 0.5)
  assert brs.match_costs == (4.0, 5.0, 2.0)
  model, _ = models.recipe_config("detr_bucketed_rank_sort")
  assert model.box_refine and model.two_stage


@pytest.mark.parametrize("field,value,match", [
    ("num_heads", 3, "model.num_heads"),
    ("num_levels", 2, "model.num_levels"),
    ("dropout", 1.0, "model.dropout"),
    ("num_queries", 10_000, "model.num_queries"),
    ("hidden_dim", 15, "model.hidden_dim"),
])
def test_model_config_errors_name_the_field(field, value, match):
  model, loss = tiny("detr_focal")
  model[field] = value
  with pytest.raises(ConfigError, match=match):
    models.check_config(model, loss)


@pytest.mark.parametrize("field,value,match", [
    ("l1_weight", 5.0, "loss.l1_weight"),
    ("delta", 0.5, "loss.delta"),
    ("pap_preset", "nope", "loss.pap_preset"),
])
def test_loss_config_errors_name_the_field(field, value, match):
  recipe = {"pap_preset": "detr_pap", "delta": "detr_focal"}.get(field, "detr_rank_sort")
  model, loss = tiny(recipe)
  loss[field] = value
  with pytest.raises(ConfigError, match=match):
    models.check_config(model, loss)


# Each detector config compiles for ~30 s: the default suite keeps bucketed RS.
@pytest.mark.parametrize("recipe", [
    pytest.param(r, marks=() if r == "detr_bucketed_rank_sort" else pytest.mark.slow)
    for r in query_based.RECIPE_NAMES])
def test_every_recipe_gives_finite_losses_and_gradients(recipe):
  model, loss = tiny(recipe)
  value, metrics, state, grads = loss_and_grads(model, loss, make_batch())
  assert np.isfinite(value) and value > 0
  assert metrics["num_positives"] == 5  # every ground truth matched once
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and max(norms) > 0
  assert int(state.count) == 1


@pytest.mark.slow  # ~45 s
@pytest.mark.parametrize("recipe", ["detr_focal", "detr_bucketed_rank_sort"])
def test_padding_examples_contribute_nothing(recipe):
  model, loss = tiny(recipe)
  full = make_batch((3, 2))
  padded = dict(full, valid=jnp.asarray([True, False]))
  alone = {k: v[:1] for k, v in full.items()}
  a = loss_and_grads(model, loss, padded)[0]
  b = loss_and_grads(model, loss, alone)[0]
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_images_without_boxes_train():
  model, loss = tiny("detr_bucketed_rank_sort")
  value, metrics, _, grads = loss_and_grads(model, loss, make_batch((0, 0)))
  assert np.isfinite(value) and metrics["num_positives"] == 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_focal_set_loss_matches_a_numpy_reference():
  """One layer of the focal recipe against scipy's matching and NumPy losses."""
  rng = np.random.default_rng(1)
  b, q, k, g = 2, 7, 3, 4
  logits = rng.normal(size=(b, q, k)).astype(np.float32)
  cxcy = rng.uniform(0.2, 0.8, (b, q, 2))
  wh = rng.uniform(0.05, 0.3, (b, q, 2))
  boxes = np.concatenate([cxcy, wh], -1).astype(np.float32)
  xy = rng.uniform(0, 0.6, (b, g, 2))
  gt = np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (b, g, 2))], -1).astype(np.float32)
  labels = rng.integers(0, k, (b, g))
  mask = np.array([[True, True, True, False], [True, False, False, False]])
  settings = query_based.check_loss_config(query_based.default_loss_config("focal"))
  total, metrics = recipes.set_loss(settings, logits, boxes, jnp.asarray(gt),
                                    jnp.asarray(labels), jnp.asarray(mask),
                                    jnp.ones((b,), bool))

  def cxcywh_to_xyxy(x):
    return np.concatenate([x[..., :2] - x[..., 2:] / 2, x[..., :2] + x[..., 2:] / 2], -1)

  def giou(a, c):
    lt, rb = np.maximum(a[:2], c[:2]), np.minimum(a[2:], c[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    union = np.prod(a[2:] - a[:2]) + np.prod(c[2:] - c[:2]) - inter
    hull = np.prod(np.maximum(a[2:], c[2:]) - np.minimum(a[:2], c[:2]))
    return inter / union - (hull - union) / hull

  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  cls_sum = l1_sum = giou_sum = 0.0
  onehot = np.zeros((b, q, k))
  for i in range(b):
    real = np.flatnonzero(mask[i])
    pred = cxcywh_to_xyxy(boxes[i].astype(np.float64))
    cost = np.zeros((q, len(real)))
    for jj, j in enumerate(real):
      pos = 0.25 * (1 - p[i, :, labels[i, j]]) ** 2 * -np.log(p[i, :, labels[i, j]])
      neg = 0.75 * p[i, :, labels[i, j]] ** 2 * -np.log(1 - p[i, :, labels[i, j]])
      gcx = np.concatenate([(gt[i, j, :2] + gt[i, j, 2:]) / 2, gt[i, j, 2:] - gt[i, j, :2]])
      l1 = np.abs(boxes[i] - gcx).sum(-1)
      gi = np.array([giou(pred[r], gt[i, j]) for r in range(q)])
      cost[:, jj] = 2 * (pos - neg) + 5 * l1 - 2 * gi
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    for r, cidx in zip(rows, cols):
      j = real[cidx]
      onehot[i, r, labels[i, j]] = 1
      gcx = np.concatenate([(gt[i, j, :2] + gt[i, j, 2:]) / 2, gt[i, j, 2:] - gt[i, j, :2]])
      l1_sum += np.abs(boxes[i, r] - gcx).sum()
      giou_sum += 1 - giou(pred[r], gt[i, j])
  pt = np.where(onehot == 1, p, 1 - p)
  at = np.where(onehot == 1, 0.25, 0.75)
  cls_sum = np.sum(at * (1 - pt) ** 2 * -np.log(pt))
  n = mask.sum()
  expected = 2 * cls_sum / n + 5 * l1_sum / n + 2 * giou_sum / n
  np.testing.assert_allclose(float(total), expected, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["cls_loss"]), cls_sum / n, rtol=1e-4)


def test_rank_sort_set_loss_value_balances_the_box_terms():
  rng = np.random.default_rng(2)
  b, q, k, g = 2, 6, 3, 2
  logits = jnp.asarray(rng.normal(size=(b, q, k)), jnp.float32)
  boxes = jnp.asarray(np.concatenate([rng.uniform(0.3, 0.6, (b, q, 2)),
                                      rng.uniform(0.2, 0.4, (b, q, 2))], -1), jnp.float32)
  gt = jnp.asarray([[[0.1, 0.1, 0.5, 0.5], [0.4, 0.4, 0.9, 0.8]]] * b, jnp.float32)
  labels = jnp.asarray([[0, 2]] * b)
  mask = jnp.ones((b, g), bool)
  settings = query_based.check_loss_config(query_based.default_loss_config("rank_sort"))
  total, metrics = recipes.set_loss(settings, logits, boxes, gt, labels, mask,
                                    jnp.ones((b,), bool))
  # L1 and GIoU each carry the ranking loss's value: total = 3 x (2 x RS).
  np.testing.assert_allclose(float(total), 3 * float(metrics["cls_loss"]), rtol=1e-5)
  assert metrics["num_positives"] == 4


@pytest.mark.slow
def test_dropout_is_deterministic_per_count():
  model, loss = tiny("detr_focal", dropout=0.1)
  batch = make_batch()
  state = models.init_loss_state(model, loss)
  a = loss_and_grads(model, loss, batch, state)[0]
  b = loss_and_grads(model, loss, batch, state)[0]
  c = loss_and_grads(model, loss, batch, state._replace(count=state.count + 1))[0]
  assert a == b and a != c


def test_detect_gives_top_scored_clipped_boxes():
  model, loss = tiny("detr_bucketed_rank_sort", two_stage=False, box_refine=False)
  detector = models.build_detector(model, loss, rngs=nnx.Rngs(0))
  det = detector.detect(make_batch()["image"], max_detections=40, score_threshold=0.0)
  assert det.boxes.shape == (2, 40, 4)
  # 10 queries x 3 classes = 30 pairs: the last 10 slots are padding.
  assert det.valid[:, :30].all() and not det.valid[:, 30:].any()
  assert np.all(np.diff(np.asarray(det.scores[:, :30]), axis=1) <= 0)
  assert float(det.boxes.min()) >= 0 and float(det.boxes.max()) <= SIZE


@pytest.mark.slow
@pytest.mark.parametrize("box_refine,two_stage", [(False, False), (True, False), (True, True)])
def test_variants_train(box_refine, two_stage):
  model, loss = tiny("detr_focal", box_refine=box_refine, two_stage=two_stage)
  value, metrics, _, _ = loss_and_grads(model, loss, make_batch())
  assert np.isfinite(value)
  assert ("enc_loss" in metrics) == two_stage


@pytest.mark.slow
def test_loss_is_float32_for_bfloat16_models():
  model, loss = tiny("detr_bucketed_rank_sort", dtype="bfloat16")
  detector = models.build_detector(model, loss, rngs=nnx.Rngs(0))
  value, metrics, _ = detector.loss(make_batch(), models.init_loss_state(model, loss))
  assert value.dtype == jnp.float32 and np.isfinite(float(value))


def test_pap_state_holds_the_preset_or_theta():
  model, loss = tiny("detr_pap")
  state = models.init_loss_state(model, loss)
  np.testing.assert_allclose(state.pap.grad_scale, losses.PRESETS["retinanet"].grad_scale)
  loss.pap_theta = (0.5,) * 41
  state = models.init_loss_state(model, loss)
  expected = losses.params_from_theta(jnp.full((41,), 0.5))
  np.testing.assert_allclose(state.pap.h2, expected.h2)


def test_lr_multipliers_scale_matching_parameters():
  model, loss = tiny("detr_focal")
  detector = models.build_detector(model, loss, rngs=nnx.Rngs(0))
  params = nnx.split(detector, nnx.Param, ...)[1]
  grads = jax.tree.map(jnp.ones_like, params)
  scaled = optim.scale_by_path((("sampling_offsets", 0.1), ("backbone", 0.5)))
  updates, _ = scaled.update(grads, scaled.init(params))
  seen = set()
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = jax.tree_util.keystr(path)
    expected = 0.1 if "sampling_offsets" in name else 0.5 if "backbone" in name else 1.0
    np.testing.assert_allclose(u, expected)
    seen.add(expected)
  assert seen == {0.1, 0.5, 1.0}


@pytest.mark.parametrize("name,recipe", [
    ("deformable_detr_focal", "detr_focal"), ("deformable_detr_rs", "detr_rank_sort"),
    ("deformable_detr_brs", "detr_bucketed_rank_sort"), ("deformable_detr_pap", "detr_pap")])
def test_coco_configs_are_the_published_recipes(name, recipe):
  from jaxrank.train import config as config_lib
  from jaxrank.train import presets

  c = presets.coco_config(name)
  config_lib.validate(c)
  model, loss = models.recipe_config(recipe)
  assert query_based.check_model_config(c.model.copy_and_resolve_references()) == (
      query_based.check_model_config(model.copy_and_resolve_references()))
  assert query_based.check_loss_config(c.loss) == query_based.check_loss_config(loss)
  assert c.optimizer.name == "adamw" and c.optimizer.lr == 2e-4
  assert c.optimizer.lr_reference_batch_size == 32 and c.train.batch_size == 32
  assert c.optimizer.weight_decay == 1e-4 and c.optimizer.grad_clip_norm == 0.1
  assert dict(c.optimizer.lr_multipliers) == {"backbone": 0.1, "sampling_offsets": 0.1,
                                              "reference_points": 0.1}
  assert c.optimizer.warmup_steps == 0 and c.optimizer.schedule == "step"
  assert tuple(c.optimizer.decay_epochs) == (40,) and c.optimizer.decay_factor == 0.1
  assert c.train.num_epochs == 50 and c.data.image_size == 800
  assert c.model.backbone == "resnet50" and c.model.num_queries == 300
  assert c.eval.score_threshold == 0.0 and c.eval.max_detections == 100
  tx, _ = optim.build_optimizer(c.optimizer, global_batch_size=32, total_steps=10,
                                steps_per_epoch=5)
  assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.slow  # ~75 s
def test_trains_resumes_and_predicts_through_the_trainer(tmp_path, jax_cache):
  import jaxrank
  from jaxrank.train import trainer

  workdir = str(tmp_path / "run")
  config = tiny_config("detr_bucketed_rank_sort", train__num_steps=2,
                       train__checkpoint_every=2)
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


def test_hungarian_targets_follow_the_matching():
  cost = jnp.asarray([[[0.0, 5.0], [5.0, 0.0], [1.0, 1.0]]])
  m = ops.hungarian_match(cost, jnp.asarray([[True, True]]))
  assert list(np.asarray(m.gt_index[0])) == [0, 1, -1]
