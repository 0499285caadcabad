"""Bad inputs give a clear error (concrete) or a documented NaN (traced under jit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank import losses

LOGITS = jnp.array([2.0, -1.0, 0.5, 0.3, 1.5, -2.0])
TARGETS = jnp.array([0.0, 0.0, 0.8, 0.0, 0.6, -1.0])
LOC = jnp.full(6, 0.3)
QUALITY = jnp.array([0.0, 0.0, 0.7, 0.0, 0.4, 0.0])
PARAMS = losses.PRESETS["retinanet"]

RANKING = {
    "ap": losses.ap_loss,
    "rank_sort": losses.rank_sort_loss,
    "bucketed_ap": losses.bucketed_ap_loss,
    "bucketed_rank_sort": losses.bucketed_rank_sort_loss,
    "alrp": lambda x, y, **kw: losses.alrp_loss(x, y, LOC, **kw)[0],
    "pap": lambda x, y, **kw: losses.parameterized_ap_loss(x, y, QUALITY, PARAMS, **kw),
}


@pytest.mark.parametrize("name", ["rank_sort", "bucketed_rank_sort"])
def test_iou_targets_above_one(name):
  fn = RANKING[name]
  targets = TARGETS.at[2].set(100.0)
  with pytest.raises(ValueError, match="targets"):
    fn(LOGITS, targets)
  with pytest.raises(ValueError, match="targets"):
    losses.ranking_errors(LOGITS, targets, loss=name)
  value, grad = jax.jit(jax.value_and_grad(fn))(LOGITS, targets)
  assert np.isnan(float(value)) and np.isnan(np.asarray(grad)).all()
  assert np.isfinite(float(jax.jit(fn)(LOGITS, TARGETS.at[2].set(1.0))))  # 1 is allowed


@pytest.mark.parametrize("name", list(RANKING))
def test_nan_targets(name):
  fn = RANKING[name]
  targets = TARGETS.at[1].set(jnp.nan)
  with pytest.raises(ValueError, match="NaN"):
    fn(LOGITS, targets)
  assert np.isnan(float(jax.jit(fn)(LOGITS, targets)))


def test_alrp_negative_or_nan_loc_errors():
  for bad in (-0.5, np.nan):
    loc = LOC.at[2].set(bad)
    with pytest.raises(ValueError, match="loc_errors"):
      losses.alrp_loss(LOGITS, TARGETS, loc)
    cls_loss, loc_loss = jax.jit(losses.alrp_loss)(LOGITS, TARGETS, loc)
    assert np.isnan(float(cls_loss)) and np.isnan(float(loc_loss))
  # read only at positives: a negative value elsewhere, or at a masked positive, is fine
  assert np.isfinite(float(losses.alrp_loss(LOGITS, TARGETS, LOC.at[0].set(-1.0))[0]))
  where = jnp.array([True, True, False, True, True, True])
  assert np.isfinite(float(losses.alrp_loss(LOGITS, TARGETS, LOC.at[2].set(-1.0), where=where)[0]))


def test_pap_non_monotone_knots():
  knots = np.array(PARAMS.h2)
  knots[4], knots[6] = knots[6], knots[4]  # x_2 > x_3
  params = PARAMS._replace(h2=knots)
  with pytest.raises(ValueError, match="knots"):
    losses.parameterized_ap_loss(LOGITS, TARGETS, QUALITY, params)
  decreasing_y = np.array(PARAMS.i1)
  decreasing_y[5] = 0.9
  with pytest.raises(ValueError, match="knots"):
    losses.parameterized_ap_loss(LOGITS, TARGETS, QUALITY, PARAMS._replace(i1=decreasing_y))
  value = jax.jit(losses.parameterized_ap_loss)(LOGITS, TARGETS, QUALITY, params)
  assert np.isnan(float(value))


def test_pap_nan_theta():
  theta = np.full(41, 0.5)
  theta[3] = np.nan
  with pytest.raises(ValueError, match="theta"):
    losses.params_from_theta(theta)
  loss = jax.jit(lambda t: losses.parameterized_ap_loss(LOGITS, TARGETS, QUALITY,
                                                        losses.params_from_theta(t)))
  assert np.isnan(float(loss(theta)))
  assert np.isfinite(float(loss(np.full(41, 0.5))))


def test_pap_nan_quality_at_positive():
  quality = QUALITY.at[4].set(jnp.nan)
  with pytest.raises(ValueError, match="quality"):
    losses.parameterized_ap_loss(LOGITS, TARGETS, quality, PARAMS)
  assert np.isnan(float(jax.jit(losses.parameterized_ap_loss)(LOGITS, TARGETS, quality, PARAMS)))
  elsewhere = QUALITY.at[0].set(jnp.nan)  # read only at positives
  assert np.isfinite(float(losses.parameterized_ap_loss(LOGITS, TARGETS, elsewhere, PARAMS)))


def test_pap_params_as_dict():
  with pytest.raises(TypeError, match="PAPParams"):
    losses.parameterized_ap_loss(LOGITS, TARGETS, QUALITY, PARAMS._asdict())


@pytest.mark.parametrize("name", list(RANKING))
def test_string_where_ranking(name):
  where = np.array(["yes"] * 6)
  with pytest.raises(TypeError, match="where must be a boolean"):
    RANKING[name](LOGITS, TARGETS, where=where)


def test_string_where_elementwise():
  where = np.array(["a", "b"])
  x = jnp.ones(2)
  for fn in (losses.l1_loss, losses.smooth_l1_loss, losses.sigmoid_focal_loss):
    with pytest.raises(TypeError, match="where must be a boolean"):
      fn(x, x, where=where)
  with pytest.raises(TypeError, match="where must be a boolean"):
    losses.giou_loss(jnp.array([[0.0, 0.0, 1.0, 1.0]] * 2), jnp.array([[0.0, 0.0, 1.0, 1.0]] * 2),
                     where=where)
  with pytest.raises(TypeError, match="where must be a boolean"):
    losses.weighted_mean(x, x, where=where)
  # numeric masks keep working: nonzero is True
  np.testing.assert_allclose(losses.l1_loss(x, 0 * x, where=np.array([1, 0])), [1.0, 0.0])
