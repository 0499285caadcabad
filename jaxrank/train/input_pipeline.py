"""Datasets and batch iterators for training and evaluation, from the ``data`` config.

Training batches are a deterministic function of ``(data.seed, step)``: :func:`train_batches`
is one Grain pipeline over all the steps of a run, and a resumed run starts it at the saved
iterator state (the position of the next batch), so it sees exactly the batches an
uninterrupted run would have seen, with any ``data.num_workers``.
"""

from __future__ import annotations

import logging
import os

from jaxrank.data import (
  BatchIterator,
  DetectionDataset,
  iterate_batches,
  load_coco_folder,
  load_tfds_coco,
  num_batches,
  synthetic_splits,
)

log = logging.getLogger(__name__)


def build_datasets(
  data_config, *, with_train: bool = True
) -> tuple[DetectionDataset | None, DetectionDataset]:
  """``(train, val)`` datasets of ``data.source`` (``train`` None without ``with_train``).

  Raises:
    FileNotFoundError: a COCO folder or annotation file does not exist.
    ValueError: malformed annotations.
  """
  source = data_config.source
  if source == "synthetic":
    size = int(data_config.synthetic_image_size) or int(data_config.image_size)
    train, val = synthetic_splits(
      int(data_config.seed),
      int(data_config.num_train) if with_train else 0,
      int(data_config.num_val),
      image_size=size,
      num_classes=int(data_config.num_classes),
      max_objects=int(data_config.max_objects),
      min_size=int(data_config.min_object_size),
      max_size=int(data_config.max_object_size) or None,
    )
  elif source == "coco_folder":
    splits = ("train", "val") if with_train else ("val",)
    for split in splits:
      for key, check, what in ((f"{split}_images", os.path.isdir, "image folder"),
                               (f"{split}_annotations", os.path.isfile, "annotation file")):
        if not check(data_config[key]):
          raise FileNotFoundError(f"data.{key}: {what} not found: {data_config[key]!r}")
    train = None
    if with_train:
      train = load_coco_folder(
        data_config.train_images, data_config.train_annotations,
        on_corrupt=data_config.on_corrupt,
      )
    val = load_coco_folder(
      data_config.val_images, data_config.val_annotations, on_corrupt=data_config.on_corrupt
    )
  elif source == "tfds":
    data_dir = data_config.tfds_data_dir or None
    train = load_tfds_coco(data_config.train_split, data_dir=data_dir) if with_train else None
    val = load_tfds_coco(data_config.val_split, data_dir=data_dir)
  else:
    raise ValueError(f"unknown data.source {source!r}")
  if data_config.max_val_images and len(val) > data_config.max_val_images:
    val = val.subset(range(int(data_config.max_val_images)))
  if with_train and len(train) == 0:
    raise ValueError(f"the training set ({source}) has no images")
  if len(val) == 0:
    raise ValueError(f"the validation set ({source}) has no images")
  return train, val


def steps_per_epoch(dataset: DetectionDataset, per_host_batch: int, shard_count: int) -> int:
  """Full training batches per epoch on every host (the remainder is dropped)."""
  return num_batches(
    len(dataset), batch_size=per_host_batch, drop_remainder=True, shard_count=shard_count
  )


def train_batches(
  dataset: DetectionDataset,
  data_config,
  *,
  per_host_batch: int,
  start_step: int,
  num_steps: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> BatchIterator:
  """This host's training batches of steps ``start_step .. num_steps - 1``, across epochs:
  shuffled by ``(data.seed, epoch)``, augmented with randomness from ``(data.seed, epoch,
  example)``, each epoch's incomplete last batch dropped (the batches of
  :func:`jaxrank.data.iterate_batches` with ``drop_remainder=True``), built by
  ``data.num_workers`` loader processes."""
  per_epoch = steps_per_epoch(dataset, per_host_batch, shard_count)
  epoch, batch_in_epoch = divmod(start_step, per_epoch)
  return iterate_batches(
    dataset,
    batch_size=per_host_batch,
    image_size=int(data_config.image_size),
    max_boxes=int(data_config.max_boxes),
    shuffle=True,
    seed=int(data_config.seed),
    epoch=epoch,
    num_epochs=-(-num_steps // per_epoch) - epoch,
    augment=data_config.augment,
    drop_remainder=True,
    shard_index=shard_index,
    shard_count=shard_count,
    num_workers=int(data_config.num_workers),
    prefetch=int(data_config.prefetch),
    start_batch=batch_in_epoch,
    max_batches=max(0, num_steps - start_step),
  )


def eval_batches(
  dataset: DetectionDataset,
  data_config,
  *,
  per_host_batch: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> BatchIterator:
  """This host's evaluation batches: every image once, in order, the last batch padded
  with ``valid=False`` examples."""
  return iterate_batches(
    dataset,
    batch_size=per_host_batch,
    image_size=int(data_config.image_size),
    max_boxes=int(data_config.max_boxes),
    shuffle=False,
    augment=False,
    drop_remainder=False,
    shard_index=shard_index,
    shard_count=shard_count,
    num_workers=int(data_config.num_workers),
    prefetch=int(data_config.prefetch),
  )
