"""Tests of COCO evaluation helpers."""

import json

import numpy as np
import pytest

from jaxrank.data import make_synthetic_dataset
from jaxrank.train.evaluation import detections_to_coco_results, evaluate_coco, write_coco_results


@pytest.fixture(scope="module")
def synth():
  return make_synthetic_dataset(6, image_size=64, min_size=6, num_classes=3, seed=2)


def _gt_as_detections(ds, scale, max_dets=8):
  """Ground truth of ``ds`` as one padded batch in resized coordinates."""
  b = len(ds) + 1
  boxes = np.zeros((b, max_dets, 4), np.float32)
  scores = np.zeros((b, max_dets), np.float32)
  classes = np.full((b, max_dets), -1, np.int32)
  for i in range(len(ds)):
    ex = ds.load(i)
    n = len(ex["boxes"])
    boxes[i, :n] = ex["boxes"] * scale
    scores[i, :n] = np.linspace(0.9, 0.5, n)
    classes[i, :n] = ex["labels"]
  image_ids = np.array([r.image_id for r in ds.records] + [-1], np.int32)
  valid = np.arange(b) < len(ds)
  scales = np.full((b,), scale, np.float32)
  return image_ids, boxes, scores, classes, valid, scales


def test_perfect_detections_give_ap_one(synth):
  results = detections_to_coco_results(*_gt_as_detections(synth, 0.75), synth.label_to_category_id)
  assert len(results) == len(synth.coco["annotations"])
  m = evaluate_coco(synth.coco, results, class_names=synth.class_names)
  for key in ("AP", "AP50", "AP75"):
    assert m[key] == pytest.approx(1.0)
  assert set(m["per_class_AP"]) == set(synth.class_names)
  assert all(v == pytest.approx(1.0) for v in m["per_class_AP"].values())
  recall, precision = m["pr_curve"]["recall"], m["pr_curve"]["precision"]
  assert recall.shape == precision.shape == (101,)
  np.testing.assert_allclose(precision, 1.0)
  assert m["pr_curve"]["per_class_precision"].shape == (3, 101)
  assert "Average Precision" in m["summary"]


def test_empty_results_give_zero(synth):
  m = evaluate_coco(synth.coco, [])
  for key in ("AP", "AP50", "AP75", "AR100"):
    assert m[key] == 0.0
  assert all(v == 0.0 for v in m["per_class_AP"].values())
  np.testing.assert_array_equal(m["pr_curve"]["precision"], 0.0)
  assert "Average Precision" in m["summary"]


def test_wrong_class_and_unknown_image(synth):
  image_ids, boxes, scores, classes, valid, scales = _gt_as_detections(synth, 1.0)
  classes = np.where(classes >= 0, (classes + 1) % 3, classes)
  results = detections_to_coco_results(image_ids, boxes, scores, classes, valid, scales,
                                       synth.label_to_category_id)
  assert evaluate_coco(synth.coco, results)["AP"] < 0.5
  with pytest.raises(ValueError, match="not in the ground truth"):
    bogus = {"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}
    evaluate_coco(synth.coco, [bogus])


def test_scale_round_trip_and_skips():
  boxes = np.array([[[10, 20, 30, 60], [0, 0, 5, 5], [1, 1, 2, 2]], [[3, 3, 4, 4]] * 3], np.float32)
  scores = np.array([[0.9, 0.8, np.nan], [0.5] * 3], np.float32)
  classes = np.array([[1, -1, 0], [0] * 3], np.int32)
  results = detections_to_coco_results(
    [7, 8], boxes, scores, classes, [True, False], [0.5, 1.0], {0: 3, 1: 9}
  )
  assert len(results) == 1
  (r,) = results
  assert r["image_id"] == 7 and r["category_id"] == 9
  assert r["score"] == pytest.approx(0.9)
  np.testing.assert_allclose(r["bbox"], [20, 40, 40, 80])
  x, y, w, h = r["bbox"]
  np.testing.assert_allclose(np.array([x, y, x + w, y + h]) * 0.5, boxes[0, 0])
  with pytest.raises(ValueError, match="boxes"):
    detections_to_coco_results([1], boxes, scores, classes, [True], [1.0], {0: 1})


def test_write_results(tmp_path, synth):
  results = detections_to_coco_results(*_gt_as_detections(synth, 2.0), synth.label_to_category_id)
  path = tmp_path / "out" / "results.json"
  write_coco_results(path, results)
  loaded = json.loads(path.read_text())
  assert loaded == results
  assert evaluate_coco(synth.coco, loaded)["AP"] == pytest.approx(1.0)
