"""Tests of the synthetic shapes dataset."""

import numpy as np
import pytest

from jaxrank.data import SHAPE_NAMES, make_synthetic_dataset, synthetic_splits


def _pairwise_iou(b):
  lt = np.maximum(b[:, None, :2], b[None, :, :2])
  rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = np.prod(b[:, 2:] - b[:, :2], -1)
  return inter / (area[:, None] + area[None] - inter)


def test_deterministic_for_seed():
  a = make_synthetic_dataset(6, image_size=64, seed=3)
  b = make_synthetic_dataset(6, image_size=64, seed=3)
  c = make_synthetic_dataset(6, image_size=64, seed=4)
  for i in range(6):
    np.testing.assert_array_equal(a.load(i)["image"], b.load(i)["image"])
    np.testing.assert_array_equal(a.load(i)["boxes"], b.load(i)["boxes"])
  assert a.coco == b.coco
  assert not np.array_equal(a.load(0)["image"], c.load(0)["image"])
  prefix = make_synthetic_dataset(3, image_size=64, seed=3)
  np.testing.assert_array_equal(prefix.load(2)["image"], a.load(2)["image"])


def test_splits_are_disjoint():
  train, val = synthetic_splits(0, 8, 8, image_size=48)
  assert len(train) == 8 and len(val) == 8
  train_images = {train.load(i)["image"].tobytes() for i in range(8)}
  assert not train_images & {val.load(i)["image"].tobytes() for i in range(8)}


def test_boxes_tight_and_inside():
  ds = make_synthetic_dataset(40, image_size=(64, 80), num_classes=5, seed=1)
  anns = {}
  for a in ds.coco["annotations"]:
    anns.setdefault(a["image_id"], []).append(a)
  min_fill = {"square": 1.0, "disc": 0.7, "triangle": 0.4, "cross": 0.4, "ring": 0.45}
  for i in range(len(ds)):
    ex = ds.load(i)
    img, boxes, labels = ex["image"], ex["boxes"], ex["labels"]
    assert img.shape == (64, 80, 3) and img.dtype == np.uint8
    assert boxes.dtype == np.float32 and labels.dtype == np.int32
    assert len(boxes) >= 1
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= 80) and np.all(boxes[:, 3] <= 64)
    assert np.all(boxes[:, 2:] - boxes[:, :2] >= 1)
    np.testing.assert_array_equal(boxes, np.round(boxes))
    if len(boxes) > 1:
      iou = _pairwise_iou(boxes)
      np.fill_diagonal(iou, 0)
      assert iou.max() <= 0.55
    gt = anns[ex["image_id"]]
    assert len(gt) == len(boxes)
    for a, box, label in zip(gt, boxes, labels):
      x, y, w, h = a["bbox"]
      np.testing.assert_allclose([x, y, x + w, y + h], box)
      assert a["category_id"] == ds.label_to_category_id[int(label)]
      fill = a["area"] / (w * h)
      assert min_fill[ds.class_names[label]] <= fill + 1e-6 <= 1.0 + 1e-6


def test_several_classes_and_sizes():
  ds = make_synthetic_dataset(48, image_size=128, num_classes=5, seed=0)
  labels = np.concatenate([r.labels for r in ds.records])
  assert set(labels.tolist()) == set(range(5))
  assert ds.class_names == SHAPE_NAMES[:5]
  assert [c["name"] for c in ds.coco["categories"]] == list(SHAPE_NAMES[:5])
  areas = np.array([a["area"] for a in ds.coco["annotations"]])
  assert areas.min() < 32**2 and areas.max() > 40**2
  assert all(a["iscrowd"] == 0 for a in ds.coco["annotations"])


def test_images_read_only():
  ds = make_synthetic_dataset(1, image_size=32, min_size=4)
  with pytest.raises(ValueError):
    ds.load(0)["image"][0, 0, 0] = 1


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_classes"):
    make_synthetic_dataset(1, num_classes=0)
  with pytest.raises(ValueError, match="min_size"):
    make_synthetic_dataset(1, image_size=32, min_size=40)


def test_many_images_fast_enough():
  ds = make_synthetic_dataset(128, image_size=128, seed=7)
  assert len(ds) == 128 and len(ds.coco["images"]) == 128
