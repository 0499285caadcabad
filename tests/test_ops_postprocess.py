import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank import ops


def _np_nms(boxes, scores, classes, thr, max_output):
  order = np.argsort(-scores, kind="stable")
  keep, removed = [], np.zeros(len(boxes), bool)
  iou = np.asarray(ops.pairwise_iou(boxes, boxes))
  for i in order:
    if removed[i]:
      continue
    keep.append(i)
    removed |= (iou[i] > thr) & (classes == classes[i])
  return np.array(keep[:max_output], np.int64)


def _clustered_boxes(rng, n):
  centres = rng.uniform(0, 100, (6, 2))[rng.integers(0, 6, n)] + rng.normal(0, 4, (n, 2))
  wh = rng.uniform(10, 30, (n, 2))
  return np.concatenate([centres - wh / 2, centres + wh / 2], 1).astype(np.float32)


def test_nms_matches_numpy_greedy():
  rng = np.random.default_rng(0)
  boxes = _clustered_boxes(rng, 60)
  scores = rng.uniform(size=60).astype(np.float32)
  nms = jax.jit(ops.nms, static_argnames=("max_output",))
  for thr in (0.3, 0.5, 0.7):
    idx, valid = nms(boxes, scores, iou_threshold=thr, max_output=60)
    expected = _np_nms(boxes, scores, np.zeros(60), thr, 60)
    assert 1 < len(expected) < 60
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], expected)
    assert not np.any(np.asarray(valid)[len(expected):])
  idx, valid = nms(boxes, scores, iou_threshold=0.5, max_output=3)
  np.testing.assert_array_equal(idx, _np_nms(boxes, scores, np.zeros(60), 0.5, 3))
  assert np.all(valid)


def test_batched_nms_and_mask():
  rng = np.random.default_rng(1)
  boxes = _clustered_boxes(rng, 40)
  scores = rng.uniform(size=40).astype(np.float32)
  classes = rng.integers(0, 3, 40)
  mask = rng.uniform(size=40) > 0.3
  idx, valid = ops.batched_nms(boxes, scores, classes, iou_threshold=0.5, max_output=50,
                               mask=mask)
  expected = _np_nms(boxes[mask], scores[mask], classes[mask], 0.5, 50)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], np.nonzero(mask)[0][expected])
  idx, valid = ops.nms(boxes, scores, max_output=5, mask=np.zeros(40, bool))
  assert not np.any(valid) and np.all(np.asarray(idx) == 0)


def test_postprocess_shapes_and_properties():
  rng = np.random.default_rng(2)
  sizes = (120, 30)
  num_anchors, num_classes = sum(sizes), 4
  boxes = _clustered_boxes(rng, num_anchors)
  logits = rng.normal(-2.0, 2.0, (num_anchors, num_classes)).astype(np.float32)
  post = jax.jit(lambda l, b: ops.postprocess_detections(
      l, b, num_anchors_per_level=sizes, pre_nms_top_k=50, max_detections=20))
  det = post(logits, boxes)
  assert det.boxes.shape == (20, 4) and det.scores.shape == (20,)
  assert det.classes.shape == (20,) and det.classes.dtype == jnp.int32
  assert det.valid.dtype == jnp.bool_
  valid = np.asarray(det.valid)
  n = int(valid.sum())
  assert 0 < n <= 20 and np.all(valid[:n]) and not np.any(valid[n:])
  s = np.asarray(det.scores)
  assert np.all(np.diff(s[:n]) <= 0) and np.all(s[:n] > 0.05) and np.all(s[n:] == 0)
  b, c = np.asarray(det.boxes[:n]), np.asarray(det.classes[:n])
  iou = np.asarray(ops.pairwise_iou(b, b))
  same = (c[:, None] == c[None]) & ~np.eye(n, dtype=bool)
  assert np.all(iou[same] <= 0.5)
  # Every output is a real (anchor, class) pair with the reported score.
  probs = 1 / (1 + np.exp(-logits))
  for box, score, cls in zip(b, s[:n], c):
    a = np.nonzero(np.all(boxes == box, axis=1))[0]
    assert np.any(np.isclose(probs[a, cls], score, rtol=1e-5))


def test_postprocess_global_topk_and_vmap():
  rng = np.random.default_rng(3)
  boxes = _clustered_boxes(rng, 50)
  logits = np.full((50, 3), -10.0, np.float32)
  logits[7, 2] = 3.0
  det = ops.postprocess_detections(logits, boxes, max_detections=5)
  np.testing.assert_array_equal(det.valid, [True, False, False, False, False])
  np.testing.assert_allclose(det.boxes[0], boxes[7])
  assert int(det.classes[0]) == 2
  batched = jax.jit(jax.vmap(lambda l, b: ops.postprocess_detections(l, b, max_detections=5)))
  det = batched(np.stack([logits, logits - 20]), np.stack([boxes, boxes]))
  assert det.boxes.shape == (2, 5, 4)
  np.testing.assert_array_equal(det.valid.sum(1), [1, 0])


def test_nms_keeps_box_with_iou_exactly_at_threshold():
  # IoUs are ratios of small integers, exact in float32: 100/200, 100/400 and 60/100
  # (the last equals the float32 rounding of the threshold 0.6).
  for big, thr in (([0, 0, 20, 10], 0.5), ([0, 0, 40, 10], 0.25), ([0, 0, 10, 6], 0.6)):
    boxes = np.array([[0, 0, 10, 10], big], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    assert float(ops.aligned_iou(boxes[0], boxes[1])) == np.float32(thr)
    idx, valid = ops.nms(boxes, scores, iou_threshold=thr, max_output=2)
    np.testing.assert_array_equal(valid, [True, True])
    np.testing.assert_array_equal(idx, [0, 1])
    _, valid = ops.nms(boxes, scores, iou_threshold=np.nextafter(np.float32(thr), 0),
                       max_output=2)
    np.testing.assert_array_equal(valid, [True, False])
  logits = np.array([[2.0], [1.0]], np.float32)
  det = ops.postprocess_detections(logits, np.array([[0, 0, 10, 10], [0, 0, 20, 10]]),
                                   iou_threshold=0.5, max_detections=2)
  np.testing.assert_array_equal(det.valid, [True, True])


@pytest.mark.parametrize("thr", [float("nan"), -0.1, 1.5, float("inf")])
def test_invalid_iou_threshold_raises(thr):
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11]], np.float32)
  with pytest.raises(ValueError, match="iou_threshold"):
    ops.nms(boxes, np.ones(2), iou_threshold=thr, max_output=2)
  with pytest.raises(ValueError, match="iou_threshold"):
    ops.batched_nms(boxes, np.ones(2), np.zeros(2), iou_threshold=thr, max_output=2)
  with pytest.raises(ValueError, match="iou_threshold"):
    ops.postprocess_detections(np.zeros((2, 1)), boxes, iou_threshold=thr)
  # Under jit a traced threshold cannot be checked: no box is kept instead.
  _, valid = jax.jit(lambda t: ops.nms(boxes, np.ones(2), iou_threshold=t, max_output=2))(thr)
  assert not np.any(valid)
  det = jax.jit(lambda t: ops.postprocess_detections(np.zeros((2, 1)), boxes,
                                                     iou_threshold=t))(thr)
  assert not np.any(det.valid)


def test_nan_score_threshold_raises():
  boxes = np.array([[0, 0, 10, 10]], np.float32)
  with pytest.raises(ValueError, match="score_threshold"):
    ops.postprocess_detections(np.zeros((1, 1)), boxes, score_threshold=float("nan"))
  det = jax.jit(lambda t: ops.postprocess_detections(np.zeros((1, 1)), boxes,
                                                     score_threshold=t))(float("nan"))
  assert not np.any(det.valid)
  det = ops.postprocess_detections(np.zeros((1, 1)), boxes, score_threshold=-1.0)
  assert bool(det.valid[0])


def test_multiclass_nms_class_specific_boxes_and_mask():
  from jaxrank.ops import multiclass_nms

  scores = jnp.asarray([[0.9, 0.1], [0.8, 0.7], [0.95, 0.2]])
  boxes = jnp.asarray([
      [[0, 0, 10, 10], [20, 20, 30, 30]],
      [[0, 0, 10, 9], [20, 20, 30, 31]],
      [[50, 50, 60, 60], [0, 0, 1, 1]],
  ], jnp.float32)
  mask = jnp.asarray([True, True, False])
  dets = multiclass_nms(scores, boxes, mask=mask, score_threshold=0.15, iou_threshold=0.5,
                        max_detections=4)
  # Row 2 is masked; class 0 keeps row 0 (row 1 overlaps it); class 1 keeps row 1's box.
  assert dets.valid.tolist() == [True, True, False, False]
  np.testing.assert_allclose(dets.scores[:2], [0.9, 0.7])
  assert dets.classes[:2].tolist() == [0, 1]
  np.testing.assert_allclose(dets.boxes[1], [20, 20, 30, 31])
  agnostic = multiclass_nms(scores, boxes[:, 0], score_threshold=0.0, max_detections=3)
  assert agnostic.valid.all() and agnostic.scores.tolist()[0] == pytest.approx(0.95)
  with pytest.raises(ValueError, match="boxes"):
    multiclass_nms(scores, boxes[:2], max_detections=3)
