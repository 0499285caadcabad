"""Datasets and batch iterators for training and evaluation, from the ``data`` config.

Training batches are a deterministic function of ``(data.seed, epoch, batch index)``:
:func:`train_batches` can start in the middle of an epoch, which is how a resumed run sees
exactly the batches an uninterrupted run would have seen.
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
  epoch: int,
  start_batch: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
) -> BatchIterator:
  """This host's training batches of ``epoch`` from batch ``start_batch`` on: shuffled
  by ``(data.seed, epoch)``, augmented with randomness from ``(data.seed, epoch, example)``,
  incomplete last batch dropped (the same batches as :func:`jaxrank.data.iterate_batches`
  with ``drop_remainder=True``)."""
  return iterate_batches(
    dataset,
    batch_size=per_host_batch,
    image_size=int(data_config.image_size),
    max_boxes=int(data_config.max_boxes),
    shuffle=True,
    seed=int(data_config.seed),
    epoch=epoch,
    augment=data_config.augment,
    drop_remainder=True,
    shard_index=shard_index,
    shard_count=shard_count,
    prefetch=int(data_config.prefetch),
    num_workers=int(data_config.num_workers) or None,
    start_batch=start_batch,
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
    prefetch=int(data_config.prefetch),
    num_workers=int(data_config.num_workers) or None,
  )
