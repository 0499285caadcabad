"""Detection data: datasets (synthetic shapes, COCO), transforms and batching."""

from jaxrank.data.batching import (
  BatchIterator,
  collate,
  epoch_batch_indices,
  iterate_batches,
  iterate_epochs,
  num_batches,
  padding_example,
  prepare_example,
)
from jaxrank.data.coco import clip_coco_box, load_coco_folder, load_tfds_coco
from jaxrank.data.dataset import (
  CorruptImageError,
  DetectionDataset,
  Record,
  SourceImage,
  read_image,
)
from jaxrank.data.synthetic import SHAPE_NAMES, make_synthetic_dataset, synthetic_splits
from jaxrank.data.transforms import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  normalize_images,
  prepare_image_for_inference,
)

__all__ = [
  "BatchIterator",
  "CorruptImageError",
  "DetectionDataset",
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "Record",
  "SHAPE_NAMES",
  "SourceImage",
  "clip_coco_box",
  "collate",
  "epoch_batch_indices",
  "iterate_batches",
  "iterate_epochs",
  "load_coco_folder",
  "load_tfds_coco",
  "make_synthetic_dataset",
  "normalize_images",
  "num_batches",
  "padding_example",
  "prepare_example",
  "prepare_image_for_inference",
  "read_image",
  "synthetic_splits",
]
