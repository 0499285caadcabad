"""Fixed-shape batches on Grain: worker processes, sharding across hosts, resumable.

A batch is a dict of numpy arrays:

* ``image`` uint8 ``[B, S, S, 3]``: RGB resized to fit ``S x S`` keeping the aspect ratio,
  zero-padded at the bottom/right (:func:`jaxrank.data.normalize_images` turns it into the
  detectors' float input, inside the jitted step);
* ``image_hw`` int32 ``[B, 2]``: height and width of the image inside the padding;
* ``boxes`` float32 ``[B, M, 4]``: xyxy in the resized image's pixels, zero padding;
* ``labels`` int32 ``[B, M]``: ``0..C-1``, ``-1`` padding;
* ``box_mask`` bool ``[B, M]``;
* ``image_id`` int32 ``[B]`` (``-1`` for padding examples);
* ``scale`` float32 ``[B]``: ``resized = original * scale``;
* ``valid`` bool ``[B]``: False for the padding examples completing the last batch.

Order depends only on ``(seed, epoch)``; every host draws the same global permutation
and takes every ``shard_count``-th example from ``shard_index``, so hosts read disjoint
examples and yield the same number of batches. Augmentation randomness comes from
``(seed, epoch, example index)``. A batch is therefore a function of its position in the
stream, whatever the number of loader processes: :class:`BatchIterator` is a Grain pipeline
(``grain.MapDataset`` of example positions, mapped, batched, prefetched by
``num_workers`` processes) whose state is the position of its next batch.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grain
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
  if mode != "none" and rng is None:
    raise ValueError("augmentation needs an rng")
  image, boxes, labels, scale = transforms.augment_to_fit(image, boxes, labels, rng, mode,
                                                          image_size)
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
    "image": transforms.pad_image(image, image_size),
    "image_hw": np.array(image.shape[:2], np.int32),
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
    "image": np.zeros((image_size, image_size, 3), np.uint8),
    "image_hw": np.zeros((2,), np.int32),
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


def _check_layout(batch_size: int, shard_index: int, shard_count: int) -> None:
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")


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
  _check_layout(batch_size, shard_index, shard_count)
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


class StreamPositions(Sequence):
  """``(epoch, example index)`` of every example slot of this host's batches
  ``first_batch, first_batch + 1, ...`` (counted across epochs), ``index -1`` for padding.

  The random-access source of the Grain pipeline: each process draws an epoch's order once
  (:func:`epoch_batch_indices`) and keeps the latest.
  """

  def __init__(self, num_examples: int, *, batch_size: int, shuffle: bool, seed: int,
               drop_remainder: bool, shard_index: int, shard_count: int, first_batch: int,
               batch_count: int):
    self.num_examples, self.batch_size, self.shuffle, self.seed = (
      num_examples, batch_size, shuffle, seed)
    self.drop_remainder, self.shard_index, self.shard_count = (
      drop_remainder, shard_index, shard_count)
    self.first_batch, self.batch_count = first_batch, batch_count
    self.batches_per_epoch = num_batches(
      num_examples, batch_size=batch_size, drop_remainder=drop_remainder,
      shard_count=shard_count)
    self._epoch, self._rows = -1, None

  def rows(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._rows = epoch_batch_indices(
        self.num_examples, batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed,
        epoch=epoch, drop_remainder=self.drop_remainder, shard_index=self.shard_index,
        shard_count=self.shard_count)
      self._epoch = epoch
    return self._rows

  def __len__(self) -> int:
    return self.batch_count * self.batch_size

  def __getitem__(self, position: int) -> tuple[int, int]:
    if not 0 <= position < len(self):
      raise IndexError(f"example position {position} not in [0, {len(self)})")
    batch, slot = divmod(position, self.batch_size)
    epoch, row = divmod(self.first_batch + batch, self.batches_per_epoch)
    return epoch, int(self.rows(epoch)[row, slot])

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_epoch": -1, "_rows": None}


class ExampleLoader:
  """``(epoch, index) -> example`` in batch format: the Grain map, run in the loader processes
  (picklable: it holds the dataset and the settings only)."""

  def __init__(self, dataset: DetectionDataset, *, image_size: int, max_boxes: int,
               augment: str, seed: int):
    self.dataset, self.image_size, self.max_boxes = dataset, image_size, max_boxes
    self.augment, self.seed = augment, seed
    self.warned = False

  def __call__(self, position: tuple[int, int]) -> dict[str, np.ndarray]:
    epoch, index = position
    if index < 0:
      return padding_example(self.image_size, self.max_boxes)
    rng = None
    if self.augment != "none":
      rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, epoch, index)))
    example, truncated = prepare_example(
      self.dataset.load(index), image_size=self.image_size, max_boxes=self.max_boxes,
      augment=self.augment, rng=rng)
    if truncated and not self.warned:
      self.warned = True
      log.warning("image %d has more than max_boxes=%d boxes; keeping the largest (warned "
                  "once per loader process)", int(example["image_id"]), self.max_boxes)
    return example


def _absl_flags_parsed() -> None:
  """Grain's loader processes read absl flags (their defaults here) and fail unless they are
  parsed: outside an absl app, mark them parsed."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def loader_process_init(worker_index: int, worker_count: int) -> None:
  """Grain ``worker_init_fn``: a loader process ignores Ctrl-C (the training process handles
  it and then stops the loaders) and exits when the training process is gone (killed by
  SIGKILL, say) instead of waiting for it forever."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = os.getppid()

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)

  threading.Thread(target=watch, name="jaxrank-parent-watch", daemon=True).start()


class BatchIterator:
  """Batches of a :class:`StreamPositions`, built by a Grain pipeline: in the calling thread
  (``num_workers=0``, for debugging) or by ``num_workers`` processes, each ``prefetch``
  batches ahead (round-robin, so the order does not depend on ``num_workers``).

  :meth:`get_state` is ``{"next_batch": n}``, the stream position of the next batch; a
  pipeline built from that position continues with exactly that batch, with any number of
  workers. Use as a context manager or call :meth:`close` to stop the workers early.
  """

  def __init__(self, positions: StreamPositions, loader: ExampleLoader, *,
               num_workers: int = 0, prefetch: int = 2):
    if num_workers < 0 or prefetch < 0:
      raise ValueError(f"num_workers and prefetch must be >= 0, got {num_workers}, {prefetch}")
    self.positions = positions
    self._next = positions.first_batch
    self._left = positions.batch_count
    # Grain's own batching: in a loader process it stacks straight into shared memory.
    dataset = grain.MapDataset.source(positions).map(loader).batch(positions.batch_size)
    if num_workers == 0:
      stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    else:
      _absl_flags_parsed()
      stream = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, prefetch))
      ).mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(1, prefetch)),
        worker_init_fn=loader_process_init)
    self._shared = num_workers > 0
    self._iterator = iter(stream) if self._left else None

  def __len__(self) -> int:
    return self.positions.batch_count

  def __iter__(self) -> BatchIterator:
    return self

  def __enter__(self) -> BatchIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __next__(self) -> Batch:
    if self._left == 0 or self._iterator is None:
      self.close()
      raise StopIteration
    batch = next(self._iterator)
    if self._shared:  # plain ndarray views; the shared memory goes when they do
      batch = {k: v.view(np.ndarray) for k, v in batch.items()}
    self._next += 1
    self._left -= 1
    return batch

  def get_state(self) -> dict[str, int]:
    """``{"next_batch": stream position of the next batch}``."""
    return {"next_batch": self._next}

  def close(self) -> None:
    """Stops the loader processes (if any) and ends the iteration."""
    self._left = 0
    iterator, self._iterator = self._iterator, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass


def iterate_batches(
  dataset: DetectionDataset,
  *,
  batch_size: int,
  image_size: int,
  max_boxes: int,
  shuffle: bool = True,
  seed: int = 0,
  epoch: int = 0,
  num_epochs: int = 1,
  augment: bool | str | None = False,
  drop_remainder: bool = False,
  shard_index: int = 0,
  shard_count: int = 1,
  num_workers: int = 0,
  prefetch: int = 2,
  start_batch: int = 0,
  max_batches: int | None = None,
) -> BatchIterator:
  """This host's share of ``dataset`` in batches, from batch ``start_batch`` of ``epoch`` on.

  Args:
    batch_size: examples per batch on this host.
    image_size: side ``S`` of the square batch images.
    max_boxes: ``M``; an image with more boxes keeps the ``M`` largest (warned once).
    shuffle, seed, epoch: the order is a permutation drawn from ``(seed, epoch)``;
      augmentation randomness comes from ``(seed, epoch, example index)``.
    num_epochs: epochs in the stream (from ``epoch`` on).
    augment: False, True (= "flip") or "ssd".
    drop_remainder: drop each epoch's last incomplete batch instead of padding it with
      ``valid=False`` examples.
    shard_index, shard_count: this host's share.
    num_workers: loader processes (0: the calling thread builds each batch on demand).
    prefetch: batches each loader process prepares ahead.
    start_batch: skip the stream's first batches (resuming mid-epoch gives the same batches).
    max_batches: stop after this many batches (default: at the end of the last epoch).
  """
  mode = _augment_mode(augment)
  if mode not in transforms.AUGMENTATIONS:
    raise ValueError(
      f"unknown augmentation {augment!r}; expected one of {transforms.AUGMENTATIONS}"
    )
  _check_layout(batch_size, shard_index, shard_count)  # here too: the positions are lazy
  per_epoch = num_batches(len(dataset), batch_size=batch_size, drop_remainder=drop_remainder,
                          shard_count=shard_count)
  first = epoch * per_epoch + start_batch
  available = max(0, (epoch + num_epochs) * per_epoch - first)
  count = available if max_batches is None else min(int(max_batches), available)
  positions = StreamPositions(
    len(dataset), batch_size=batch_size, shuffle=shuffle, seed=seed,
    drop_remainder=drop_remainder, shard_index=shard_index, shard_count=shard_count,
    first_batch=first, batch_count=count)
  loader = ExampleLoader(dataset, image_size=image_size, max_boxes=max_boxes, augment=mode,
                         seed=seed)
  return BatchIterator(positions, loader, num_workers=num_workers, prefetch=prefetch)


def iterate_epochs(
  dataset: DetectionDataset, *, start_epoch: int = 0, num_epochs: int = 1, **kwargs
) -> Iterator[Batch]:
  """Batches of ``num_epochs`` consecutive epochs; ``kwargs`` go to :func:`iterate_batches`."""
  with iterate_batches(dataset, epoch=start_epoch, num_epochs=num_epochs, **kwargs) as it:
    yield from it
