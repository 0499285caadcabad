"""Fixed-shape batches with sharding across hosts and background prefetch.

A batch is a dict of numpy arrays:

* ``image`` float32 ``[B, S, S, 3]``: ImageNet-normalised, resized to fit ``S x S``
  keeping the aspect ratio, zero-padded at the bottom/right;
* ``boxes`` float32 ``[B, M, 4]``: xyxy in the resized image's pixels, zero padding;
* ``labels`` int32 ``[B, M]``: ``0..C-1``, ``-1`` padding;
* ``box_mask`` bool ``[B, M]``;
* ``image_id`` int32 ``[B]`` (``-1`` for padding examples);
* ``scale`` float32 ``[B]``: ``resized = original * scale``;
* ``valid`` bool ``[B]``: False for the padding examples completing the last batch.

Order depends only on ``(seed, epoch)``; every host draws the same global permutation
and takes every ``shard_count``-th example from ``shard_index``, so hosts read disjoint
examples and yield the same number of batches.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxrank.data import transforms
from jaxrank.data.dataset import DetectionDataset

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


def _augment_mode(augment: bool | str | None) -> str:
  if augment is None or augment is False:
    return "none"
  if augment is True:
    return "flip"
  return str(augment)


def prepare_example(
  example: dict[str, Any],
  *,
  image_size: int,
  max_boxes: int,
  augment: bool | str | None = False,
  rng: np.random.Generator | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
  """One example in batch format, and whether boxes beyond ``max_boxes`` were dropped.

  ``augment``: False/"none", True/"flip" or "ssd" (see :func:`transforms.augment`).
  With augmentation, ``scale`` relates the augmented image to the resized one.
  """
  mode = _augment_mode(augment)
  image = example["image"]
  boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
  labels = np.asarray(example["labels"], np.int32).reshape(-1)
  if mode != "none":
    if rng is None:
      raise ValueError("augmentation needs an rng")
    image, boxes, labels = transforms.augment(image, boxes, labels, rng, mode)
  image, boxes, scale = transforms.resize_to_fit(image, boxes, image_size)
  boxes, labels = transforms.clip_and_filter(boxes, labels, *image.shape[:2])
  truncated = len(boxes) > max_boxes
  if truncated:
    keep = np.sort(np.argsort(-transforms.box_areas(boxes), kind="stable")[:max_boxes])
    boxes, labels = boxes[keep], labels[keep]
  n = len(boxes)
  out_boxes = np.zeros((max_boxes, 4), np.float32)
  out_boxes[:n] = boxes
  out_labels = np.full((max_boxes,), -1, np.int32)
  out_labels[:n] = labels
  return {
    "image": transforms.pad_and_normalize(image, image_size),
    "boxes": out_boxes,
    "labels": out_labels,
    "box_mask": np.arange(max_boxes) < n,
    "image_id": np.int32(example["image_id"]),
    "scale": np.float32(scale),
    "valid": np.bool_(True),
  }, truncated


def padding_example(image_size: int, max_boxes: int) -> dict[str, np.ndarray]:
  """An all-padding example (``valid`` False, no boxes)."""
  return {
    "image": np.zeros((image_size, image_size, 3), np.float32),
    "boxes": np.zeros((max_boxes, 4), np.float32),
    "labels": np.full((max_boxes,), -1, np.int32),
    "box_mask": np.zeros((max_boxes,), bool),
    "image_id": np.int32(-1),
    "scale": np.float32(1.0),
    "valid": np.bool_(False),
  }


def collate(examples: Sequence[dict[str, np.ndarray]]) -> Batch:
  """Stacks per-example arrays into a batch."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def epoch_batch_indices(
  num_examples: int,
  *,
  batch_size: int,
  shuffle: bool,
  seed: int,
  epoch: int,
  drop_remainder: bool,
  shard_index: int = 0,
  shard_count: int = 1,
) -> np.ndarray:
  """``int64 [num_batches, batch_size]`` example indices of this shard for one epoch,
  ``-1`` where a padding example goes."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  order = np.arange(num_examples)
  if shuffle:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, epoch)))
    order = rng.permutation(num_examples)
  per_shard = num_examples // shard_count if drop_remainder else -(-num_examples // shard_count)
  mine = order[shard_index::shard_count][:per_shard]
  mine = np.concatenate([mine, np.full(per_shard - len(mine), -1, mine.dtype)])
  if drop_remainder:
    num_batches = per_shard // batch_size
    return mine[: num_batches * batch_size].reshape(num_batches, batch_size)
  num_batches = -(-per_shard // batch_size)
  mine = np.concatenate([mine, np.full(num_batches * batch_size - per_shard, -1, mine.dtype)])
  return mine.reshape(num_batches, batch_size)


def num_batches(
  num_examples: int, *, batch_size: int, drop_remainder: bool, shard_count: int = 1
) -> int:
  """Batches per epoch on each shard."""
  if drop_remainder:
    return (num_examples // shard_count) // batch_size
  return math.ceil(math.ceil(num_examples / shard_count) / batch_size)


_END = object()


class _Failure:
  def __init__(self, exc: BaseException):
    self.exc = exc


def _build(
  row: np.ndarray,
  make_example: Callable[[int], dict[str, np.ndarray]],
  pool: concurrent.futures.Executor | None,
) -> Batch:
  if pool is None:
    return collate([make_example(int(i)) for i in row])
  return collate(list(pool.map(make_example, (int(i) for i in row))))


def _produce(
  rows: np.ndarray,
  make_example: Callable[[int], dict[str, np.ndarray]],
  out: queue.Queue,
  stop: threading.Event,
  num_workers: int,
) -> None:
  """Fills ``out`` with batches then ``_END`` (or a ``_Failure``) until ``stop`` is set."""

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        out.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  pool = (
    concurrent.futures.ThreadPoolExecutor(num_workers, "jaxrank-load") if num_workers > 1 else None
  )
  try:
    for row in rows:
      if stop.is_set() or not put(_build(row, make_example, pool)):
        return
    put(_END)
  except BaseException as e:  # re-raised in the consumer
    put(_Failure(e))
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)


class BatchIterator:
  """Iterator over one epoch's batches, built ``prefetch`` batches ahead by a
  background thread (``prefetch=0``: built on demand in the caller's thread).

  Use as a context manager or call :meth:`close` to stop early; an abandoned iterator
  stops its thread when garbage-collected.
  """

  def __init__(
    self,
    batch_indices: np.ndarray,
    make_example: Callable[[int], dict[str, np.ndarray]],
    *,
    prefetch: int = 2,
    num_workers: int = 2,
  ):
    self._stop = threading.Event()
    self._rows = batch_indices
    self._make = make_example
    self._position = 0
    self._done = len(batch_indices) == 0
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    if prefetch > 0 and not self._done:
      self._queue = queue.Queue(maxsize=prefetch)
      self._thread = threading.Thread(
        target=_produce,
        args=(batch_indices, make_example, self._queue, self._stop, num_workers),
        name="jaxrank-prefetch",
        daemon=True,
      )
      self._thread.start()

  def __len__(self) -> int:
    return len(self._rows)

  def __iter__(self) -> BatchIterator:
    return self

  def __enter__(self) -> BatchIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    self._stop.set()

  def __next__(self) -> Batch:
    if self._done:
      raise StopIteration
    if self._queue is None:
      batch = _build(self._rows[self._position], self._make, None)
      self._position += 1
      self._done = self._position == len(self._rows)
      return batch
    item = self._queue.get()
    if item is _END:
      self.close()
      raise StopIteration
    if isinstance(item, _Failure):
      self.close()
      raise item.exc
    return item

  def close(self) -> None:
    """Stops the background thread and ends the iteration."""
    self._done = True
    self._stop.set()
    if self._thread is not None:
      self._thread.join()


def iterate_batches(
  dataset: DetectionDataset,
  *,
  batch_size: int,
  image_size: int,
  max_boxes: int,
  shuffle: bool = True,
  seed: int = 0,
  epoch: int = 0,
  augment: bool | str | None = False,
  drop_remainder: bool = False,
  shard_index: int = 0,
  shard_count: int = 1,
  prefetch: int = 2,
  num_workers: int | None = None,
  start_batch: int = 0,
) -> BatchIterator:
  """Batches of one epoch of this host's shard of ``dataset``.

  Args:
    batch_size: examples per batch on this host.
    image_size: side ``S`` of the square batch images.
    max_boxes: ``M``; an image with more boxes keeps the ``M`` largest (warned once).
    shuffle, seed, epoch: the order is a permutation drawn from ``(seed, epoch)``;
      augmentation randomness comes from ``(seed, epoch, example index)``.
    augment: False, True (= "flip") or "ssd".
    drop_remainder: drop the last incomplete batch instead of padding it with
      ``valid=False`` examples.
    shard_index, shard_count: this host's share.
    prefetch: batches built ahead in a background thread (0: none).
    num_workers: threads decoding and transforming examples (default: up to 4).
    start_batch: skip the epoch's first batches (resuming mid-epoch gives the same batches).
  """
  mode = _augment_mode(augment)
  if mode not in transforms.AUGMENTATIONS:
    raise ValueError(
      f"unknown augmentation {augment!r}; expected one of {transforms.AUGMENTATIONS}"
    )
  rows = epoch_batch_indices(
    len(dataset),
    batch_size=batch_size,
    shuffle=shuffle,
    seed=seed,
    epoch=epoch,
    drop_remainder=drop_remainder,
    shard_index=shard_index,
    shard_count=shard_count,
  )[start_batch:]
  warned = threading.Event()

  def make_example(index: int) -> dict[str, np.ndarray]:
    if index < 0:
      return padding_example(image_size, max_boxes)
    rng = None
    if mode != "none":
      rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, epoch, index)))
    example, truncated = prepare_example(
      dataset.load(index), image_size=image_size, max_boxes=max_boxes, augment=mode, rng=rng
    )
    if truncated and not warned.is_set():
      warned.set()
      log.warning(
        "image %d has more than max_boxes=%d boxes; keeping the largest (warned once)",
        int(example["image_id"]),
        max_boxes,
      )
    return example

  if num_workers is None:
    num_workers = min(4, os.cpu_count() or 1)
  return BatchIterator(rows, make_example, prefetch=prefetch, num_workers=num_workers)


def iterate_epochs(
  dataset: DetectionDataset, *, start_epoch: int = 0, num_epochs: int | None = None, **kwargs
) -> Iterator[Batch]:
  """Batches of consecutive epochs (forever if ``num_epochs`` is None); ``kwargs`` go to
  :func:`iterate_batches`."""
  epoch = start_epoch
  while num_epochs is None or epoch < start_epoch + num_epochs:
    with iterate_batches(dataset, epoch=epoch, **kwargs) as it:
      yield from it
    epoch += 1
