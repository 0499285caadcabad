"""Tests of transforms, batching, sharding and the Grain pipeline (loader processes, state)."""

import logging
import multiprocessing
import os
import time

import numpy as np
import pytest

from jaxrank.data import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  DetectionDataset,
  Record,
  iterate_batches,
  iterate_epochs,
  make_synthetic_dataset,
  normalize_images,
  num_batches,
  transforms,
)

# Batches of the thread-pool pipeline this Grain pipeline replaced (commit 7f07d75), for the
# dataset and settings of test_same_batches_as_before_grain.
BEFORE_GRAIN = os.path.join(os.path.dirname(__file__), "data", "batches_before_grain.npz")


@pytest.fixture(scope="module")
def synth():
  return make_synthetic_dataset(10, image_size=48, min_size=6, seed=0)


def _manual_dataset(images, boxes, labels):
  records = [
    Record(i + 1, im.shape[1], im.shape[0], np.asarray(b, np.float32).reshape(-1, 4),
           np.asarray(l, np.int32), im)
    for i, (im, b, l) in enumerate(zip(images, boxes, labels))
  ]
  coco = {
    "images": [{"id": r.image_id, "width": r.width, "height": r.height} for r in records],
    "annotations": [],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
  }
  return DetectionDataset(records, coco, label_to_category_id={0: 1, 1: 2}, class_names=["a", "b"])


def test_batch_shapes_padding_and_masks(synth):
  batches = list(iterate_batches(synth, batch_size=4, image_size=32, max_boxes=8, shuffle=False))
  assert len(batches) == 3
  b = batches[-1]
  assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
  assert b["image_hw"].dtype == np.int32
  np.testing.assert_array_equal(b["image_hw"], [[32, 32], [32, 32], [0, 0], [0, 0]])
  assert b["boxes"].shape == (4, 8, 4) and b["boxes"].dtype == np.float32
  assert b["labels"].dtype == np.int32 and b["box_mask"].dtype == bool
  assert b["image_id"].dtype == np.int32 and b["scale"].dtype == np.float32
  np.testing.assert_array_equal(b["valid"], [True, True, False, False])
  np.testing.assert_array_equal(b["image_id"], [9, 10, -1, -1])
  for b in batches:
    np.testing.assert_array_equal(b["box_mask"], b["labels"] >= 0)
    assert np.all(b["boxes"][~b["box_mask"]] == 0)
    assert np.all(b["boxes"][..., 2:] > b["boxes"][..., :2] - 1e-6)
    np.testing.assert_allclose(b["scale"][b["valid"]], 32 / 48)
  first = batches[0]
  for i in range(4):
    n = int(first["box_mask"][i].sum())
    src = synth.load(i)
    np.testing.assert_allclose(first["boxes"][i, :n], src["boxes"] * (32 / 48), rtol=1e-6)
    np.testing.assert_array_equal(first["labels"][i, :n], src["labels"])
  dropped = list(
    iterate_batches(synth, batch_size=4, image_size=32, max_boxes=8, drop_remainder=True)
  )
  assert len(dropped) == 2 and all(b["valid"].all() for b in dropped)


def test_resize_keeps_aspect_and_pads():
  image = np.full((20, 40, 3), 200, np.uint8)
  ds = _manual_dataset([image], [[[4, 2, 20, 18]]], [[1]])
  (b,) = iterate_batches(ds, batch_size=1, image_size=16, max_boxes=3, shuffle=False)
  assert b["scale"][0] == pytest.approx(0.4)
  np.testing.assert_allclose(b["boxes"][0, 0], [1.6, 0.8, 8.0, 7.2], rtol=1e-6)
  np.testing.assert_array_equal(b["image_hw"][0], [8, 16])
  assert np.all(b["image"][0, :8] == 200) and np.all(b["image"][0, 8:] == 0)
  image = np.asarray(normalize_images(b["image"], b["image_hw"]))
  expected = np.broadcast_to((200 - IMAGENET_MEAN) / IMAGENET_STD, (8, 16, 3))
  np.testing.assert_allclose(image[0, :8], expected, rtol=1e-5)
  assert image.dtype == np.float32 and np.all(image[0, 8:] == 0)
  orig = b["boxes"][0, 0] / b["scale"][0]
  np.testing.assert_allclose(orig, [4, 2, 20, 18], rtol=1e-5)


def test_hflip_consistent():
  image = np.zeros((10, 20, 3), np.uint8)
  image[2:5, 3:9] = 255
  flipped, boxes = transforms.hflip(image, np.array([[3, 2, 9, 5]], np.float32))
  np.testing.assert_array_equal(boxes, [[11, 2, 17, 5]])
  x1, y1, x2, y2 = boxes[0].astype(int)
  assert np.all(flipped[y1:y2, x1:x2] == 255) and flipped.sum() == image.sum()


def test_flip_augmentation_matches_plain(synth):
  kw = dict(batch_size=5, image_size=48, max_boxes=8, shuffle=False)
  plain = list(iterate_batches(synth, **kw))
  aug = list(iterate_batches(synth, augment=True, seed=1, **kw))
  flips = 0
  for p, a in zip(plain, aug):
    for i in range(5):
      n = int(p["box_mask"][i].sum())
      pb, ab = p["boxes"][i, :n], a["boxes"][i, :n]
      if np.array_equal(p["image"][i], a["image"][i]):
        np.testing.assert_array_equal(pb, ab)
      else:
        flips += 1
        np.testing.assert_array_equal(p["image"][i, :, ::-1], a["image"][i])
        np.testing.assert_allclose(ab[:, [0, 2]], 48 - pb[:, [2, 0]])
        np.testing.assert_allclose(ab[:, [1, 3]], pb[:, [1, 3]])
  assert 0 < flips < 10


def test_ssd_augmentation_valid(synth):
  for b in iterate_batches(synth, batch_size=5, image_size=40, max_boxes=8, augment="ssd", seed=2):
    boxes = b["boxes"][b["box_mask"]]
    assert np.all(boxes >= 0) and np.all(boxes <= 40)
    assert np.all(boxes[:, 2:] > boxes[:, :2])
    assert b["image"].dtype == np.uint8 and np.all(b["image_hw"] <= 40)
  with pytest.raises(ValueError, match="augmentation"):
    iterate_batches(synth, batch_size=2, image_size=40, max_boxes=8, augment="mosaic")


def test_max_boxes_keeps_largest_and_warns_once(caplog):
  image = np.zeros((32, 32, 3), np.uint8)
  boxes = [[0, 0, 2, 2], [0, 0, 20, 20], [5, 5, 9, 9], [1, 1, 30, 30]]
  ds = _manual_dataset([image, image], [boxes, boxes], [[0, 1, 0, 1], [0, 1, 0, 1]])
  with caplog.at_level(logging.WARNING):
    (b,) = iterate_batches(ds, batch_size=2, image_size=32, max_boxes=2, shuffle=False)
  np.testing.assert_array_equal(b["boxes"][0], [[0, 0, 20, 20], [1, 1, 30, 30]])
  np.testing.assert_array_equal(b["labels"][0], [1, 1])
  assert caplog.text.count("max_boxes") == 1


def test_sharding_disjoint_and_covering(synth):
  seen, lengths = [], []
  for shard in range(3):
    it = iterate_batches(synth, batch_size=2, image_size=24, max_boxes=8, seed=5,
                         shard_index=shard, shard_count=3)
    lengths.append(len(it))
    ids = [int(i) for b in it for i, v in zip(b["image_id"], b["valid"]) if v]
    seen.append(ids)
  assert lengths == [num_batches(10, batch_size=2, drop_remainder=False, shard_count=3)] * 3
  flat = [i for s in seen for i in s]
  assert len(flat) == len(set(flat)) == 10 and set(flat) == set(range(1, 11))


def test_order_deterministic_per_seed_and_epoch(synth):
  def ids(**kw):
    it = iterate_batches(synth, batch_size=3, image_size=24, max_boxes=8, augment="ssd", **kw)
    return [b["image_id"].tolist() for b in it]

  assert ids(seed=1, epoch=0) == ids(seed=1, epoch=0)
  assert ids(seed=1, epoch=0) != ids(seed=1, epoch=1)
  epochs = list(iterate_epochs(synth, num_epochs=2, batch_size=5, image_size=24, max_boxes=8))
  assert len(epochs) == 4


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_same_batches_as_before_grain(synth):
  """Order, sharding, augmentation, padding and the normalised images of the thread-pool
  pipeline that Grain replaced, over three epochs of a shard and an evaluation pass."""
  ref = np.load(BEFORE_GRAIN)
  kw = dict(batch_size=2, image_size=32, max_boxes=6, augment="ssd", seed=7, drop_remainder=True,
            shard_index=1, shard_count=2)
  runs = {
    "train": list(iterate_epochs(synth, num_epochs=3, **kw)),
    "eval": list(iterate_batches(synth, batch_size=4, image_size=32, max_boxes=6,
                                 shuffle=False)),
  }
  for name, batches in runs.items():
    assert len(batches) == len({key.split("/")[1] for key in ref if key.startswith(name)})
    for i, b in enumerate(batches):
      for key in ("boxes", "labels", "box_mask", "image_id", "scale", "valid"):
        np.testing.assert_array_equal(b[key], ref[f"{name}/{i}/{key}"], err_msg=f"{name} {key}")
      np.testing.assert_allclose(np.asarray(normalize_images(b["image"], b["image_hw"])),
                                 ref[f"{name}/{i}/image"], rtol=1e-6, atol=1e-6)


def test_loader_processes_give_the_in_process_batches_and_state_resumes(synth):
  kw = dict(batch_size=3, image_size=24, max_boxes=8, augment="ssd", seed=1, num_epochs=3,
            drop_remainder=True)
  plain = list(iterate_batches(synth, **kw))
  assert len(plain) == 9
  with iterate_batches(synth, num_workers=2, prefetch=1, **kw) as it:
    first = [next(it) for _ in range(4)]
    state = it.get_state()
  assert state == {"next_batch": 4}
  _assert_same_batches(plain[:4], first)
  # Resumed from the state (mid-epoch), with another number of loader processes.
  with iterate_batches(synth, num_workers=1, start_batch=state["next_batch"], **kw) as it:
    _assert_same_batches(plain[4:], list(it))
  assert not _loaders_alive()


def _loaders_alive(timeout: float = 10.0) -> list:
  """Grain loader processes of this process still alive after up to ``timeout`` seconds."""
  deadline = time.time() + timeout
  while True:
    alive = [p for p in multiprocessing.active_children()
             if p.is_alive() and p.name.startswith("grain")]
    if not alive or time.time() > deadline:
      return alive
    time.sleep(0.1)


def test_closing_stops_the_loader_processes(synth):
  it = iterate_batches(synth, batch_size=1, image_size=24, max_boxes=8, num_workers=2)
  assert len(it) == 10
  next(it)
  assert _loaders_alive(timeout=0)
  it.close()
  with pytest.raises(StopIteration):
    next(it)
  assert not _loaders_alive()
  with iterate_batches(synth, batch_size=4, image_size=24, max_boxes=8) as it:
    assert len(list(it)) == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_error_propagates(synth, num_workers):
  ds = _Broken(synth.records, synth.coco, label_to_category_id=synth.label_to_category_id,
               class_names=synth.class_names)
  with pytest.raises(RuntimeError, match="bad example 3"):
    with iterate_batches(ds, batch_size=2, image_size=24, max_boxes=8, shuffle=False,
                         num_workers=num_workers) as it:
      list(it)
  assert not _loaders_alive()


class _Broken(DetectionDataset):
  """Fails on example 3 (module level: loader processes unpickle it)."""

  def load(self, index):
    if index == 3:
      raise RuntimeError("bad example 3")
    return super().load(index)
