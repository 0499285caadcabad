import jax
import jax.numpy as jnp
import numpy as np

from jaxrank import ops

GT = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 130]], np.float32)
MASK = np.array([True, False, True])
ANCHORS = np.array([
    [0, 0, 10, 10],      # IoU 1 with gt0 -> positive
    [0, 0, 10, 12],      # 0.833 -> positive
    [0, 0, 10, 22],      # 0.4545 -> ignored
    [0, 0, 10, 30],      # 0.333 -> negative
    [50, 50, 60, 60],    # only overlaps the padded gt -> negative
    [100, 100, 110, 110],  # 1/3 with gt2, its best -> low-quality positive
    [100, 100, 110, 110],  # tie -> also positive
    [200, 200, 210, 210],  # no overlap -> negative
], np.float32)


def test_max_iou_assign_hand_made():
  a = jax.jit(ops.max_iou_assign)(ANCHORS, GT, MASK)
  np.testing.assert_array_equal(a.positive, [1, 1, 0, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(a.ignored, [0, 0, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(a.matched_gt)[np.asarray(a.positive)], [0, 0, 2, 2])
  np.testing.assert_allclose(a.max_iou, [1, 100 / 120, 100 / 220, 1 / 3, 0, 1 / 3, 1 / 3, 0],
                             atol=1e-5)


def test_max_iou_assign_without_low_quality():
  a = ops.max_iou_assign(ANCHORS, GT, MASK, match_low_quality=False)
  np.testing.assert_array_equal(a.positive, [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(a.ignored, [0, 0, 1, 0, 0, 0, 0, 0])


def test_low_quality_overrides_and_min_pos_iou():
  gt = np.array([[0, 0, 10, 10], [0, 0, 10, 9]], np.float32)
  anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 11]], np.float32)
  a = ops.max_iou_assign(anchors, gt, np.array([True, True]))
  # anchor0 is gt0's best (IoU 1) and gt1's best (0.9): the later gt wins, as in mmdet.
  np.testing.assert_array_equal(a.matched_gt, [1, 0])
  np.testing.assert_array_equal(a.positive, [True, True])
  a = ops.max_iou_assign(ANCHORS, GT, MASK, min_pos_iou=0.4)
  np.testing.assert_array_equal(a.positive, [1, 1, 0, 0, 0, 0, 0, 0])


def test_no_valid_gts_all_negative():
  for gt, mask in [(GT, np.zeros(3, bool)), (np.zeros((0, 4), np.float32), np.zeros(0, bool))]:
    for assign in (ops.max_iou_assign,
                   lambda x, g, m: ops.atss_assign(x, np.zeros(8, np.int32), (8,), g, m)):
      a = assign(ANCHORS, gt, mask)
      assert not np.any(a.positive) and not np.any(a.ignored)
      np.testing.assert_array_equal(a.max_iou, np.zeros(8))


def test_vmap_over_batch():
  gts = np.stack([GT, GT])
  masks = np.stack([MASK, np.zeros(3, bool)])
  a = jax.jit(jax.vmap(ops.max_iou_assign, in_axes=(None, 0, 0)))(ANCHORS, gts, masks)
  assert a.positive.shape == (2, 8)
  assert int(a.positive[0].sum()) == 4 and int(a.positive[1].sum()) == 0


def _np_atss(anchors, sizes, gts, topk):
  iou = np.asarray(ops.pairwise_iou(anchors, gts), np.float64)  # [A, M]
  actr = (anchors[:, :2] + anchors[:, 2:]) / 2
  gctr = (gts[:, :2] + gts[:, 2:]) / 2
  dist = np.linalg.norm(actr[:, None] - gctr[None], axis=-1)
  cands, start = [], 0
  for n in sizes:
    cands.append(np.argsort(dist[start:start + n], axis=0, kind="stable")[:min(topk, n)] + start)
    start += n
  cand = np.concatenate(cands)  # [K, M]
  ciou = np.take_along_axis(iou, cand, 0)
  thr = ciou.mean(0) + ciou.std(0, ddof=1)
  pos = ciou >= thr
  cc = actr[cand]  # [K, M, 2]
  inside = np.minimum(cc - gts[None, :, :2], gts[None, :, 2:] - cc).min(-1) > 0.01
  pos &= inside
  overlaps = np.full_like(iou, -np.inf)
  for j in range(gts.shape[0]):
    overlaps[cand[pos[:, j], j], j] = iou[cand[pos[:, j], j], j]
  positive = overlaps.max(1) > -np.inf
  return positive, overlaps.argmax(1)


def test_atss_matches_numpy_reference():
  anchors, levels = ops.generate_anchors(64, strides=(8, 16), ratios=(1.0,),
                                         octave_base_scale=4, scales_per_octave=1)
  sizes = ops.num_anchors_per_level(64, strides=(8, 16), ratios=(1.0,), scales_per_octave=1)
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 40, (4, 2))
  gts = np.concatenate([xy, xy + rng.uniform(8, 30, (4, 2))], 1).astype(np.float32)
  mask = np.array([True, True, True, False])
  a = jax.jit(ops.atss_assign, static_argnums=2)(anchors, levels, sizes, gts, mask)
  pos, matched = _np_atss(anchors, sizes, gts[:3], topk=9)
  assert pos.sum() > 3
  np.testing.assert_array_equal(a.positive, pos)
  np.testing.assert_array_equal(np.asarray(a.matched_gt)[pos], matched[pos])
  assert not np.any(a.ignored)
  centres = (anchors[pos, :2] + anchors[pos, 2:]) / 2
  g = gts[np.asarray(a.matched_gt)[pos]]
  assert np.all((centres > g[:, :2]) & (centres < g[:, 2:]))


def test_atss_single_gt_hand_case():
  anchors, levels = ops.generate_anchors(32, strides=(8,), ratios=(1.0,),
                                         octave_base_scale=2, scales_per_octave=1)
  gt = np.array([[0, 0, 16, 16]], np.float32)
  a = ops.atss_assign(anchors, levels, (16,), gt, np.array([True]), topk=4)
  # Candidates: the anchor centred at (8, 8) and 3 of its neighbours at distance 8; only
  # (8, 8) has its centre strictly inside the gt.
  np.testing.assert_array_equal(np.nonzero(np.asarray(a.positive))[0], [5])


def test_targets():
  a = ops.max_iou_assign(ANCHORS, GT, MASK)
  labels = np.array([3, 1, 0], np.int32)
  t = jax.jit(ops.classification_targets, static_argnums=2)(a, labels, 4)
  expected = np.zeros((8, 4), np.float32)
  expected[[0, 1], 3] = 1
  expected[[5, 6], 0] = 1
  expected[2] = -1
  np.testing.assert_array_equal(t, expected)
  iou_t = jnp.linspace(0.0, 0.7, 8)
  t = ops.classification_targets(a, labels, 4, iou_targets=iou_t)
  expected[[0, 1, 5, 6], [3, 3, 0, 0]] = np.asarray(iou_t)[[0, 1, 5, 6]]
  np.testing.assert_allclose(t, expected, atol=1e-6)
  assert t[0, 3] == 0.0
  b = np.asarray(ops.box_targets(a, GT))
  np.testing.assert_array_equal(b[[0, 1]], GT[[0, 0]])
  np.testing.assert_array_equal(b[[5, 6]], GT[[2, 2]])
  np.testing.assert_array_equal(b[[2, 3, 4, 7]], np.zeros((4, 4)))


def test_atss_threshold_uses_unbiased_std():
  # Anchors concentric with the gt (centre distance 0) are the candidates; IoUs of the
  # concentric squares are (s / 10) ** 2. Level 0 has a far anchor that top-3 leaves out;
  # level 1 has fewer anchors than topk, so all of its 2 anchors are candidates.
  gt = np.array([[0, 0, 10, 10]], np.float32)
  sides = np.array([10, 9.5, 5, 4, 3])

  def square(s, c=5.0):
    return [c - s / 2, c - s / 2, c + s / 2, c + s / 2]

  anchors = np.array([square(s) for s in sides[:3]] + [square(4, 100.0)]
                     + [square(s) for s in sides[3:]], np.float32)
  levels = np.array([0, 0, 0, 0, 1, 1], np.int32)
  cand_iou = np.minimum(sides, 10) ** 2 / np.maximum(sides, 10) ** 2
  unbiased = cand_iou.mean() + cand_iou.std(ddof=1)  # torch .std(0), as mmdet
  population = cand_iou.mean() + cand_iou.std()
  expected = np.zeros(6, bool)
  expected[[0, 1, 2, 4, 5]] = cand_iou >= unbiased
  assert population < cand_iou[1] < unbiased  # the two conventions disagree on anchor 1
  a = ops.atss_assign(anchors, levels, (4, 2), gt, np.array([True]), topk=3)
  np.testing.assert_array_equal(a.positive, expected)
  np.testing.assert_array_equal(np.nonzero(expected)[0], [0])
