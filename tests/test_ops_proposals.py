import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank.ops.proposals import Proposals, append_gt_boxes, random_sample, rpn_proposals

SIZES = (90, 40, 12)  # the last level is smaller than nms_pre


def _np_iou(box, boxes):
  lt = np.maximum(box[:2], boxes[:, :2])
  rb = np.minimum(box[2:], boxes[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
  area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)
  return inter / (area(box) + area(boxes) - inter)


def _np_rpn(logits, boxes, sizes, image_hw, nms_pre, nms_post, thr, min_size):
  """mmdet 2.x RPNHead._get_bboxes_single + _bbox_post_process, loop-style."""
  scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
  cand_s, cand_b, cand_l, start = [], [], [], 0
  for level, n in enumerate(sizes):
    s, b = scores[start:start + n], boxes[start:start + n]
    order = np.argsort(-s, kind="stable")[:min(nms_pre, n)]
    cand_s.append(s[order])
    cand_b.append(b[order])
    cand_l.append(np.full(len(order), level))
    start += n
  s, b, l = np.concatenate(cand_s), np.concatenate(cand_b), np.concatenate(cand_l)
  h, w = image_hw
  b = np.stack([np.clip(b[:, 0], 0, w), np.clip(b[:, 1], 0, h),
                np.clip(b[:, 2], 0, w), np.clip(b[:, 3], 0, h)], 1)
  keep = ((b[:, 2] - b[:, 0]) > min_size) & ((b[:, 3] - b[:, 1]) > min_size)
  s, b, l = s[keep], b[keep], l[keep]
  kept, removed = [], np.zeros(len(s), bool)
  for i in np.argsort(-s, kind="stable"):
    if removed[i]:
      continue
    kept.append(i)
    removed |= (_np_iou(b[i], b) > thr) & (l == l[i])
  kept = np.array(kept[:nms_post], np.int64)
  return b[kept], s[kept]


def _random_rpn_inputs(rng, sizes=SIZES, image_hw=(80.0, 100.0)):
  n = sum(sizes)
  centres = rng.uniform(-10, 110, (n, 2))
  wh = rng.uniform(0.5, 40, (n, 2))
  boxes = np.concatenate([centres - wh / 2, centres + wh / 2], 1).astype(np.float32)
  logits = rng.normal(0, 2, n).astype(np.float32)
  return logits, boxes, image_hw


def _check_against_reference(props, logits, boxes, sizes, image_hw, nms_pre, nms_post, thr,
                             min_size):
  ref_boxes, ref_scores = _np_rpn(logits, boxes, sizes, image_hw, nms_pre, nms_post, thr,
                                  min_size)
  valid = np.asarray(props.valid)
  n = len(ref_scores)
  assert props.boxes.shape == (nms_post, 4) and props.scores.shape == (nms_post,)
  assert np.all(valid[:n]) and not np.any(valid[n:])
  np.testing.assert_allclose(np.asarray(props.boxes)[:n], ref_boxes, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(np.asarray(props.scores)[:n], ref_scores, rtol=1e-5)
  assert np.all(np.asarray(props.boxes)[n:] == 0) and np.all(np.asarray(props.scores)[n:] == 0)
  return n


def test_rpn_proposals_match_numpy_reference():
  rng = np.random.default_rng(0)
  logits, boxes, image_hw = _random_rpn_inputs(rng)
  fn = jax.jit(rpn_proposals, static_argnames=("num_anchors_per_level", "nms_pre", "nms_post"))
  for nms_pre, nms_post, thr, min_size in ((30, 40, 0.7, 0.0), (30, 10, 0.5, 0.0),
                                           (200, 200, 0.3, 6.0)):
    props = fn(logits, boxes, SIZES, image_size=image_hw, nms_pre=nms_pre, nms_post=nms_post,
               iou_threshold=thr, min_size=min_size)
    assert isinstance(props, Proposals)
    n = _check_against_reference(props, logits, boxes, SIZES, image_hw, nms_pre, nms_post, thr,
                                 min_size)
    assert n > 0
  # With nms_post 200 the survivors do not fill the output: padded.
  assert n < 200


def test_rpn_proposals_levels_clipping_and_small_boxes():
  big = [10.0, 10.0, 50.0, 50.0]
  boxes = np.array([big, [11.0, 11.0, 51.0, 51.0],  # level 0: suppressed by the first
                    [10.0, 10.0, 50.0, 51.0],  # level 1: overlaps, other level -> kept
                    [-20.0, 30.0, 70.0, 90.0],  # level 1: clipped to (0, 30, 60, 40)
                    [5.0, 5.0, 5.5, 30.0],  # level 2: width 0.5 <= min_size 1 -> dropped
                    [70.0, 5.0, 90.0, 20.0]],  # level 2: outside in x, zero width -> dropped
                   np.float32)
  logits = np.array([3.0, 2.0, 1.0, 0.0, 4.0, 5.0], np.float32)
  props = rpn_proposals(logits, boxes, (2, 2, 2), image_size=(40, 60), nms_pre=5, nms_post=6,
                        min_size=1.0)
  valid = np.asarray(props.valid)
  np.testing.assert_array_equal(valid, [True, True, True, False, False, False])
  sig = lambda x: 1 / (1 + np.exp(-x))
  np.testing.assert_allclose(props.scores, [sig(3.0), sig(1.0), sig(0.0), 0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(props.boxes[:3], [[10, 10, 50, 40], [10, 10, 50, 40],
                                               [0, 30, 60, 40]])
  # An int image_size is a square image; min_size 0 still drops zero-area boxes.
  props = rpn_proposals(logits, boxes, (2, 2, 2), image_size=60, nms_pre=5, nms_post=6)
  assert int(np.sum(props.valid)) == 4  # the two level-0 boxes merge; the box at x>=60 goes


def test_rpn_proposals_vmap_and_no_gradient():
  rng = np.random.default_rng(1)
  batch = [_random_rpn_inputs(rng) for _ in range(2)]
  logits = np.stack([b[0] for b in batch])
  boxes = np.stack([b[1] for b in batch])
  hws = np.array([[80.0, 100.0], [60.0, 90.0]], np.float32)
  fn = jax.jit(jax.vmap(lambda l, b, hw: rpn_proposals(
      l, b, SIZES, image_size=hw, nms_pre=25, nms_post=30, iou_threshold=0.6)))
  props = fn(logits, boxes, hws)
  assert props.boxes.shape == (2, 30, 4) and props.valid.shape == (2, 30)
  for i in range(2):
    one = Proposals(*(x[i] for x in props))
    _check_against_reference(one, logits[i], boxes[i], SIZES, tuple(hws[i]), 25, 30, 0.6, 0.0)

  def total(l, b):
    props = rpn_proposals(l, b, SIZES, image_size=(80, 100), nms_pre=25, nms_post=30)
    return jnp.sum(props.scores) + jnp.sum(props.boxes)

  grad = jax.grad(total, argnums=(0, 1))(logits[0], boxes[0])
  assert all(np.all(np.asarray(g) == 0) for g in grad)


@pytest.mark.parametrize("num_pos, num_neg, exp_pos, exp_neg", [
    (10, 1000, 10, 502), (300, 1000, 128, 384), (20, 30, 20, 30), (0, 700, 0, 512)])
def test_random_sample_counts(num_pos, num_neg, exp_pos, exp_neg):
  rng = np.random.default_rng(num_pos)
  labels = rng.permutation(np.r_[np.ones(num_pos), np.zeros(num_neg), -np.ones(50)])
  positive, negative = labels == 1, labels == 0
  idx, valid, is_pos = jax.jit(random_sample)(jax.random.key(0), positive, negative)
  idx, valid, is_pos = np.asarray(idx), np.asarray(valid), np.asarray(is_pos)
  assert idx.shape == valid.shape == is_pos.shape == (512,) and idx.dtype == np.int32
  assert int(is_pos.sum()) == exp_pos and int((valid & ~is_pos).sum()) == exp_neg
  assert np.all(valid[:exp_pos + exp_neg]) and not np.any(valid[exp_pos + exp_neg:])
  assert np.all(idx[~valid] == 0) and not np.any(is_pos[~valid])
  assert len(set(idx[valid].tolist())) == exp_pos + exp_neg
  assert np.all(positive[idx[is_pos]]) and np.all(negative[idx[valid & ~is_pos]])


def test_random_sample_keys_and_uniformity():
  positive = np.zeros(60, bool)
  positive[:20] = True
  negative = ~positive
  fn = jax.jit(lambda k: random_sample(k, positive, negative, num=16, pos_fraction=0.5))
  a, b = fn(jax.random.key(1)), fn(jax.random.key(1))
  c = fn(jax.random.key(2))
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])

  num_keys = 2000
  idx, valid, is_pos = jax.jit(jax.vmap(lambda k: random_sample(
      k, positive, negative, num=16, pos_fraction=0.5)))(
          jax.random.split(jax.random.key(3), num_keys))
  assert np.all(np.asarray(valid)) and np.all(np.asarray(is_pos).sum(1) == 8)
  counts = np.bincount(np.asarray(idx).ravel(), minlength=60)
  # Each positive is chosen with probability 8/20, each negative 8/40.
  np.testing.assert_allclose(counts[:20] / num_keys, 0.4, atol=0.05)
  np.testing.assert_allclose(counts[20:] / num_keys, 0.2, atol=0.04)


def test_random_sample_rpn_setting_and_empty():
  positive = np.r_[np.ones(5, bool), np.zeros(15, bool)]
  idx, valid, is_pos = random_sample(jax.random.key(0), positive, ~positive, num=8,
                                     pos_fraction=0.5)
  assert int(np.sum(is_pos)) == 4 and int(np.sum(valid)) == 8
  idx, valid, is_pos = random_sample(jax.random.key(0), np.zeros(0, bool), np.zeros(0, bool),
                                     num=4)
  assert idx.shape == (4,) and not np.any(valid) and not np.any(is_pos)


def test_append_gt_boxes():
  props = Proposals(jnp.ones((5, 4)), jnp.full((5,), 0.5), jnp.array([1, 1, 1, 0, 0], bool))
  gt = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]], np.float32)
  mask = np.array([True, True, False])
  out = append_gt_boxes(props, gt, mask)
  assert out.boxes.shape == (8, 4) and out.scores.shape == (8,) and out.valid.shape == (8,)
  np.testing.assert_array_equal(out.valid, [1, 1, 1, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(out.boxes[5:], [[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]])
  np.testing.assert_array_equal(out.scores[5:], [1, 1, 0])
  batched = jax.vmap(append_gt_boxes)(Proposals(*(x[None] for x in props)), gt[None],
                                       mask[None])
  assert batched.boxes.shape == (1, 8, 4)


def test_bad_inputs():
  logits, boxes = np.zeros(10, np.float32), np.zeros((10, 4), np.float32)
  with pytest.raises(ValueError, match="num_anchors_per_level"):
    rpn_proposals(logits, boxes, (4, 5), image_size=32)
  for name in ("nms_pre", "nms_post"):
    with pytest.raises(ValueError, match=name):
      rpn_proposals(logits, boxes, (10,), image_size=32, **{name: 0})
  with pytest.raises(ValueError, match="iou_threshold"):
    rpn_proposals(logits, boxes, (10,), image_size=32, iou_threshold=1.5)
  with pytest.raises(ValueError, match="image_size"):
    rpn_proposals(logits, boxes, (10,), image_size=(1, 2, 3))
  mask = np.zeros(10, bool)
  for fraction in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match="pos_fraction"):
      random_sample(jax.random.key(0), mask, mask, pos_fraction=fraction)
  with pytest.raises(ValueError, match="num"):
    random_sample(jax.random.key(0), mask, mask, num=0)
  with pytest.raises(ValueError, match="gt_mask"):
    append_gt_boxes(Proposals(jnp.zeros((2, 4)), jnp.zeros(2), jnp.zeros(2, bool)),
                    np.zeros((3, 4)), np.zeros(2, bool))
