"""Loss recipes: jit + grad on a batch with a box-less image and a padding example."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrank import losses
from jaxrank.models import dense
from jaxrank.models.dense import config as recipes

SIZE = 64
NUM_CLASSES = 3


def tiny_static(config):
  """Static info of ``config``'s detector with the tiny backbone at the test size."""
  config.update(backbone="tiny", image_size=SIZE, num_classes=NUM_CLASSES)
  detector = nnx.eval_shape(lambda: dense.build_detector(config, rngs=nnx.Rngs(0)))
  return detector.static_info()


@functools.cache
def static_info(detector_name):
  return tiny_static(dense.default_model_config(detector_name))


def make_batch():
  """Image 0: two boxes, 1: one box, 2: no boxes, 3: a padding example (with a box)."""
  boxes = np.zeros((4, 3, 4), np.float32)
  labels = np.full((4, 3), -1, np.int32)
  mask = np.zeros((4, 3), bool)
  boxes[0, :2] = [[4, 6, 30, 40], [20, 10, 62, 50]]
  labels[0, :2] = [0, 2]
  boxes[1, 0] = [10, 12, 50, 34]
  labels[1, 0] = 1
  boxes[3, 0] = [10, 12, 50, 34]
  labels[3, 0] = 1
  mask[[0, 0, 1, 3], [0, 1, 0, 0]] = True
  return {"boxes": boxes, "labels": labels, "box_mask": mask,
          "valid": np.array([True, True, True, False])}


def make_outputs(static, batch_size=4, seed=0):
  num_anchors = static.anchors.shape[0]
  k1, k2 = jax.random.split(jax.random.key(seed))
  logits = jax.random.normal(k1, (batch_size, num_anchors, NUM_CLASSES)) - 3.0
  deltas = 0.5 * jax.random.normal(k2, (batch_size, num_anchors, 4))
  return dense.DetectorOutputs(logits, deltas)


def loss_config(name, **overrides):
  config = dense.default_loss_config(name)
  config.update(max_positives_per_image=128, alrp_period=2)
  config.update(overrides)
  return config


@functools.cache
def loss_and_grad(name, groups=1):
  """Jitted ``(outputs, batch, state) -> ((loss, (metrics, state)), d loss / d outputs)``."""
  static = static_info(recipes.RECIPES[name].detector)
  config = loss_config(name, ranking_groups=groups)

  @jax.jit
  def run(outputs, batch, state):
    f = lambda o: dense.detection_loss(static, o, batch, config, state)
    return jax.value_and_grad(f, has_aux=True)(outputs)

  return run


@pytest.mark.parametrize("name", dense.LOSS_NAMES)
def test_recipe_jit_grad(name):
  static = static_info(recipes.RECIPES[name].detector)
  config = loss_config(name)
  state = dense.init_loss_state(config)
  batch = make_batch()
  run = loss_and_grad(name)
  outputs = make_outputs(static)
  (loss, (metrics, new_state)), grads = run(outputs, batch, state)
  assert loss.dtype == jnp.float32 and np.isfinite(loss) and loss > 0
  for key in ("loss", "cls_loss", "box_loss", "box_weight", "num_positives"):
    assert np.isfinite(metrics[key]), key
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  total = metrics["cls_loss"] + metrics["box_weight"] * metrics["box_loss"]
  np.testing.assert_allclose(loss, total, rtol=1e-5)
  assert metrics["num_positives"] > 0
  for g in (grads.class_logits, grads.box_deltas):
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[3], 0.0)  # padding example
  np.testing.assert_array_equal(grads.box_deltas[2], 0.0)  # no boxes: no positives
  assert float(jnp.abs(grads.class_logits[:2]).max()) > 0
  assert float(jnp.abs(grads.box_deltas[:2]).max()) > 0

  if name in ("rank_sort", "bucketed_rank_sort"):
    np.testing.assert_allclose(metrics["ranking_loss"] + metrics["sorting_loss"],
                               metrics["cls_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["box_weight"] * metrics["box_loss"], metrics["cls_loss"],
                               rtol=1e-5)  # value ratio
  if name == "alrp":
    assert isinstance(new_state, losses.SelfBalanceState)
    assert int(new_state.count) == 1 and float(new_state.weight) == 50.0
    np.testing.assert_allclose(metrics["alrp_weight"], 50.0)
    (_, (metrics2, state2)), _ = run(outputs, batch, new_state)
    assert int(state2.count) == 0
    expected = (metrics["box_loss"] + metrics2["box_loss"] + metrics["cls_loss"]
                + metrics2["cls_loss"]) / (metrics["box_loss"] + metrics2["box_loss"])
    np.testing.assert_allclose(state2.weight, expected, rtol=1e-5)
  elif name == "pap":
    assert isinstance(new_state, losses.PAPParams)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)
  else:
    assert new_state == {}

  # Changing the padding example's predictions changes nothing.
  shifted = dense.DetectorOutputs(outputs.class_logits.at[3].add(5.0),
                                   outputs.box_deltas.at[3].add(1.0))
  np.testing.assert_allclose(run(shifted, batch, state)[0][0], loss, rtol=1e-6)


def test_no_positives_anywhere():
  static = static_info("atss")
  batch = make_batch()
  batch["box_mask"][:] = False
  (loss, (metrics, _)), grads = loss_and_grad("rank_sort")(make_outputs(static), batch, {})
  assert float(loss) == 0.0 and float(metrics["num_positives"]) == 0
  for g in (grads.class_logits, grads.box_deltas):
    np.testing.assert_array_equal(g, 0.0)


def test_ranking_groups_average_separate_rankings():
  """aLRP over 8 images in 2 groups = the mean of the two 4-image losses, one shared state."""
  static = static_info("retinanet")
  state = dense.init_loss_state(loss_config("alrp"))
  first, second = make_batch(), make_batch()
  second["boxes"][:, :, 0] += 2.0
  second["valid"][:] = True
  outputs = [make_outputs(static, seed=1), make_outputs(static, seed=2)]
  single = [loss_and_grad("alrp")(o, b, state)[0] for o, b in zip(outputs, (first, second))]
  both = jax.tree.map(lambda *x: np.concatenate(x), first, second)
  (loss, (metrics, new_state)), grads = loss_and_grad("alrp", 2)(
      jax.tree.map(lambda *x: jnp.concatenate(x), *outputs), both, state)
  np.testing.assert_allclose(loss, (single[0][0] + single[1][0]) / 2, rtol=1e-5)
  for key in ("cls_loss", "box_loss"):
    np.testing.assert_allclose(metrics[key], (single[0][1][0][key] + single[1][1][0][key]) / 2,
                               rtol=1e-5)
  np.testing.assert_allclose(metrics["num_positives"], single[0][1][0]["num_positives"]
                             + single[1][1][0]["num_positives"])
  np.testing.assert_allclose(new_state.cls_sum, metrics["cls_loss"], rtol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_assigner_override_and_defaults():
  resolved = dense.check_loss_config(loss_config("rank_sort"))
  assert resolved.assigner == "atss" and resolved.delta == 0.5 and resolved.fixed_weight is None
  resolved = dense.check_loss_config(loss_config("focal_giou"))
  assert resolved.assigner == "max_iou" and resolved.fixed_weight == 2.0
  resolved = dense.check_loss_config(loss_config("alrp", assigner="atss", delta=0.5,
                                                  box_loss_weight=3.0))
  assert resolved.assigner == "atss" and resolved.delta == 0.5 and resolved.fixed_weight == 3.0
  assert dense.check_loss_config(loss_config("bucketed_ap")).delta == 1.0
  assert dense.init_loss_state(loss_config("alrp")).weight == 50.0
  assert dense.init_loss_state(loss_config("rank_sort")) == {}


@pytest.mark.parametrize("field,value", [
    ("name", "focal"), ("assigner", "hungarian"), ("delta", -1.0), ("max_positives_per_image", 0),
    ("ranking_groups", 0), ("box_loss_weight", -1.0), ("alrp_period", -1),
])
def test_invalid_loss_config(field, value):
  config = loss_config("ap_smooth_l1")
  with config.unlocked():
    config[field] = value
  with pytest.raises(ValueError, match=field):
    dense.check_loss_config(config)


def test_loss_config_errors_at_call_time():
  static = static_info("retinanet")
  outputs = make_outputs(static, batch_size=4)
  with pytest.raises(ValueError, match="ranking_groups"):
    config = loss_config("focal_giou", ranking_groups=3)
    dense.detection_loss(static, outputs, make_batch(), config, {})
  config = loss_config("alrp", alrp_period=0)
  with pytest.raises(ValueError, match="alrp_period"):
    dense.detection_loss(static, outputs, make_batch(), config, dense.init_loss_state(config))
  with pytest.raises(ValueError, match=r"unknown config key.*loss\.alrp_periods"):
    dense.check_loss_config(loss_config("alrp", alrp_periods=3))
  with pytest.raises(ValueError, match="loss.delta' must be None"):
    dense.check_loss_config(loss_config("focal_giou", delta=0.5))


def test_pap_recipe_is_the_published_loss_with_scaled_box_gradient():
  """PAP recipe == parameterized_ap_loss on the one-ranking targets with quality (GIoU + 1) / 2
  of the decoded boxes; the searched gradient scale multiplies only the box-delta gradient."""
  from jaxrank import ops
  static = static_info("retinanet")
  config = loss_config("pap")
  state = dense.init_loss_state(config)
  np.testing.assert_allclose(state.grad_scale, losses.PRESETS["retinanet"].grad_scale, rtol=1e-6)
  batch = make_batch()
  outputs = make_outputs(static)
  (loss, _), grads = loss_and_grad("pap")(outputs, batch, state)

  anchors = jnp.asarray(static.anchors)
  valid = jnp.asarray(batch["valid"])
  gt_mask = jnp.asarray(batch["box_mask"]) & valid[:, None]
  a = jax.vmap(functools.partial(ops.max_iou_assign, anchors))(jnp.asarray(batch["boxes"]), gt_mask)
  positive = a.positive & valid[:, None]
  a = a._replace(positive=positive, ignored=(a.ignored | ~valid[:, None]) & ~positive)
  targets = jax.vmap(lambda x, l: ops.classification_targets(x, l, NUM_CLASSES))(
      a, jnp.asarray(batch["labels"]))
  matched = jnp.where(positive[..., None],
                      jax.vmap(ops.box_targets)(a, jnp.asarray(batch["boxes"])), anchors)

  def direct(outputs):
    pred = static.decode(outputs.box_deltas)
    quality = (1.0 + ops.aligned_giou(pred, matched)) / 2
    where = jnp.broadcast_to(~a.ignored[..., None], targets.shape)
    return losses.parameterized_ap_loss(outputs.class_logits, targets,
                                        jnp.broadcast_to(quality[..., None], targets.shape), state,
                                        where=where)

  expected, expected_grads = jax.value_and_grad(direct)(outputs)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(grads.class_logits, expected_grads.class_logits, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(grads.box_deltas, state.grad_scale * expected_grads.box_deltas,
                             rtol=1e-4, atol=1e-9)

  theta = losses.theta_from_params(losses.PRESETS["identity"])
  identity = dense.init_loss_state(loss_config("pap", pap_theta=tuple(float(t) for t in theta)))
  for got, want in zip(identity, losses.PRESETS["identity"]):
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("overrides,match", [
    ({"pap_preset": "yolo"}, "pap_preset"), ({"pap_theta": (0.5,) * 40}, "pap_theta"),
    ({"pap_theta": (1.5,) * 41}, "pap_theta"), ({"box_loss_weight": 1.0}, "box_loss_weight"),
    ({"pap_top_k": 0}, "pap_top_k"), ({"delta": 1.0}, "loss.delta' must be None"),
])
def test_invalid_pap_config(overrides, match):
  with pytest.raises(ValueError, match=match):
    dense.check_loss_config(loss_config("pap", **overrides))


def test_recipe_model_configs():
  assert dense.recipe_model_config("rank_sort").name == "atss"
  assert tuple(dense.recipe_model_config("rank_sort").anchor_ratios) == (1.0,)
  assert dense.recipe_model_config("alrp").scales_per_octave == 2
  assert dense.recipe_model_config("focal_smooth_l1").name == "retinanet"


# -- box term and weight against an independent float64 NumPy computation -------------------


@functools.cache
def recipe_static(name):
  """Static info of the recipe's published model (anchors, coder stds) at the test size."""
  return tiny_static(dense.recipe_model_config(name))


def np_assignment(name, static, batch):
  """(positive [B, A], ignored [B, A], matched box [B, A, 4], label [B, A]) from the jaxrank
  assigner of the recipe, with padding examples dropped as ``detection_loss`` does."""
  from jaxrank import ops
  anchors = jnp.asarray(static.anchors)
  valid = np.asarray(batch["valid"])
  gt_mask = jnp.asarray(batch["box_mask"] & valid[:, None])
  if recipes.RECIPES[name].assigner == "atss":
    fn = functools.partial(ops.atss_assign, anchors, jnp.asarray(static.level_index),
                           static.num_anchors_per_level, topk=recipes.ATSS_TOPK)
  else:
    fn = functools.partial(ops.max_iou_assign, anchors)
  a = jax.vmap(fn)(jnp.asarray(batch["boxes"]), gt_mask)
  positive = np.asarray(a.positive) & valid[:, None]
  ignored = (np.asarray(a.ignored) | ~valid[:, None]) & ~positive
  index = np.asarray(a.matched_gt)
  matched = np.take_along_axis(np.asarray(batch["boxes"], np.float64), index[..., None], axis=1)
  labels = np.take_along_axis(np.asarray(batch["labels"]), index, axis=1)
  return positive, ignored, matched, labels


def np_cxcywh(boxes):
  wh = boxes[..., 2:] - boxes[..., :2]
  return boxes[..., :2] + 0.5 * wh, wh


def np_encode(anchors, boxes, stds):
  """mmdet ``bbox2delta`` with zero means."""
  (actr, awh), (gctr, gwh) = np_cxcywh(anchors), np_cxcywh(boxes)
  return np.concatenate([(gctr - actr) / awh, np.log(gwh / awh)], axis=-1) / np.asarray(stds)


def np_decode(anchors, deltas, stds):
  """mmdet ``delta2bbox`` with zero means, ``dw, dh`` clamped to ``|log(16 / 1000)|``."""
  d = deltas * np.asarray(stds)
  actr, awh = np_cxcywh(anchors)
  wh = awh * np.exp(np.clip(d[..., 2:], -np.log(1000 / 16), np.log(1000 / 16)))
  ctr = actr + awh * d[..., :2]
  return np.concatenate([ctr - 0.5 * wh, ctr + 0.5 * wh], axis=-1)


def np_giou_loss(boxes, targets):
  area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  lt = np.maximum(boxes[..., :2], targets[..., :2])
  rb = np.minimum(boxes[..., 2:], targets[..., 2:])
  inter = np.prod(np.clip(rb - lt, 0.0, None), axis=-1)
  union = area(boxes) + area(targets) - inter
  hull = np.prod(np.maximum(boxes[..., 2:], targets[..., 2:])
                 - np.minimum(boxes[..., :2], targets[..., :2]), axis=-1)
  iou = inter / union
  return 1.0 - (iou - (hull - union) / hull)


def np_smooth_l1(x, beta):
  x = np.abs(x)
  return np.where(x < beta, 0.5 * x ** 2 / beta, x - 0.5 * beta)


def np_alrp_localisation(logits, targets, errors, delta):
  """aLRP ``L_loc`` (spec 3.3): positives in descending score order, prefix sums of their
  errors over their smoothed rank among positives and negatives."""
  s, y = logits.ravel(), targets.ravel()
  pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
  e = errors.ravel()[pos]
  step = lambda x: np.clip(x / (2 * delta) + 0.5, 0.0, 1.0)
  above_pos = step(s[pos][None, :] - s[pos][:, None])
  np.fill_diagonal(above_pos, 0.0)
  rank = 1.0 + above_pos.sum(1) + step(s[neg][None, :] - s[pos][:, None]).sum(1)
  order = np.argsort(s[pos], kind="stable")[::-1]
  return float(np.sum(np.cumsum(e[order]) / rank[order]) / len(pos))


BOX_RECIPES = ("focal_smooth_l1", "focal_giou", "ap_smooth_l1", "alrp", "rank_sort",
               "bucketed_rank_sort", "bucketed_ap")


@pytest.mark.parametrize("name", BOX_RECIPES)
def test_box_term_and_weight_match_numpy(name):
  static = recipe_static(name)
  config = loss_config(name)
  state = dense.init_loss_state(config)
  batch = make_batch()
  outputs = make_outputs(static, seed=3)
  _, (metrics, _) = jax.jit(lambda o: dense.detection_loss(static, o, batch, config, state))(
      outputs)

  # Published coder stds: mmdet v1 RetinaNet and PAP's focal + GIoU use 1, the others 0.1/0.2.
  stds = (np.ones(4) if name.startswith("focal") else np.array([0.1, 0.1, 0.2, 0.2]))
  anchors = np.asarray(static.anchors, np.float64)
  logits = np.asarray(outputs.class_logits, np.float64)
  deltas = np.asarray(outputs.box_deltas, np.float64)
  positive, ignored, matched, labels = np_assignment(name, static, batch)
  num_pos = positive.sum()
  assert num_pos > 0 and not positive[2:].any()
  anchors_b = np.broadcast_to(anchors, deltas.shape)
  pred = np_decode(anchors_b[positive], deltas[positive], stds)
  giou = np_giou_loss(pred, matched[positive])

  if name in ("focal_smooth_l1", "ap_smooth_l1"):
    beta = {"focal_smooth_l1": 0.11, "ap_smooth_l1": 1.0}[name]
    encoded = np_encode(anchors_b[positive], matched[positive], stds)
    total = np_smooth_l1(deltas[positive] - encoded, beta).sum()
    box_loss = total / (4 * num_pos if name == "ap_smooth_l1" else num_pos)
    weight = 1.0
  elif name == "focal_giou":
    box_loss, weight = giou.sum() / num_pos, 2.0
  elif name == "alrp":
    targets = np.zeros(logits.shape)
    rows, cols = np.nonzero(positive)
    targets[rows, cols, labels[rows, cols]] = 1.0
    targets[ignored] = -1.0
    errors = np.zeros(logits.shape)
    errors[rows, cols, :] = giou[:, None]
    box_loss = np_alrp_localisation(logits, targets, errors, delta=1.0)
    weight = 50.0  # the self-balance weight's published start
  else:
    scores = (1.0 / (1.0 + np.exp(-logits[positive]))).max(axis=-1)
    box_loss = np.sum(scores * giou) / np.sum(scores)
    weight = (2.0 if name == "bucketed_ap"
              else float(metrics["cls_loss"]) / box_loss)  # value ratio: RS value / box value

  np.testing.assert_allclose(metrics["num_positives"], num_pos)
  np.testing.assert_allclose(metrics["box_loss"], box_loss, rtol=2e-5)
  np.testing.assert_allclose(metrics["box_weight"], weight, rtol=2e-5)
  np.testing.assert_allclose(metrics["loss"], metrics["cls_loss"] + weight * box_loss, rtol=2e-5)
