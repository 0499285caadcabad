"""In-memory index of a detection dataset with lazily loaded images.

A :class:`DetectionDataset` holds one :class:`Record` per image (its id, size, ground-truth
boxes and labels, and the decoded pixels, the path of the image file, its bytes or a
:class:`SourceImage` reference into a random-access source), the
COCO-format ground truth used by evaluation, and the map from contiguous labels
``0..C-1`` back to COCO category ids.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class CorruptImageError(ValueError):
  """An image file that cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class SourceImage:
  """The encoded image ``source[index][key]`` of a random-access source (a TFDS data
  source, say), read when the example is loaded: a dataset pickled to loader processes
  carries the source (which reopens its files there) instead of the image bytes."""

  source: Sequence[Mapping[str, Any]]
  index: int
  key: str = "image"

  def read(self) -> bytes:
    return bytes(self.source[self.index][self.key])

  def __str__(self) -> str:
    return f"example {self.index} of {type(self.source).__name__}"


@dataclasses.dataclass(frozen=True)
class Record:
  """One image: ``boxes`` ``[n, 4]`` xyxy pixels, ``labels`` ``[n]`` in ``0..C-1``.

  ``source`` is a decoded ``uint8 [H, W, 3]`` array, the path of the image file, the
  encoded file's bytes, or a :class:`SourceImage`.
  """

  image_id: int
  width: int
  height: int
  boxes: np.ndarray
  labels: np.ndarray
  source: np.ndarray | str | os.PathLike | bytes | SourceImage


def _source_name(source: str | os.PathLike | bytes | SourceImage) -> str:
  if isinstance(source, (bytes, bytearray)):
    return f"<{len(source)} encoded bytes>"
  if isinstance(source, SourceImage):
    return str(source)
  return os.fspath(source)


def read_image(source: str | os.PathLike | bytes | SourceImage) -> np.ndarray:
  """Decodes an image file (a path, its bytes or a :class:`SourceImage`) to
  ``uint8 [H, W, 3]`` RGB.

  Raises :class:`CorruptImageError` naming the file if it cannot be decoded.
  """
  from PIL import Image, UnidentifiedImageError

  name = _source_name(source)
  if isinstance(source, SourceImage):
    source = source.read()
  is_bytes = isinstance(source, (bytes, bytearray))
  try:
    with Image.open(io.BytesIO(source) if is_bytes else source) as img:
      return np.asarray(img.convert("RGB"), dtype=np.uint8)
  except FileNotFoundError:
    raise FileNotFoundError(f"image file not found: {name}") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise CorruptImageError(f"cannot decode image file {name}: {e}") from e


def _size_mismatch_message(record: Record, height: int, width: int) -> str:
  source = record.source
  name = "decoded array" if isinstance(source, np.ndarray) else _source_name(source)
  message = (
    f"image {record.image_id} ({name}): the annotations give its size as "
    f"{record.width}x{record.height} (width x height) but the image is {width}x{height}; "
    "its boxes would be misaligned"
  )
  if (height, width) == (record.width, record.height):
    message += " (rotated? EXIF orientation is not applied when decoding)"
  return message


class DetectionDataset:
  """Detection examples with COCO-format ground truth.

  Attributes:
    records: one :class:`Record` per example.
    coco: COCO-format ground truth (``images``, ``annotations``, ``categories``).
    label_to_category_id: contiguous label -> COCO category id.
    class_names: name of each label.
  """

  def __init__(
    self,
    records: Sequence[Record],
    coco: Mapping[str, Any],
    *,
    label_to_category_id: Mapping[int, int],
    class_names: Sequence[str],
  ):
    for key in ("images", "annotations", "categories"):
      if key not in coco:
        raise ValueError(f"COCO ground truth lacks the key {key!r}")
    if len(class_names) != len(label_to_category_id):
      raise ValueError(
        f"{len(class_names)} class names for {len(label_to_category_id)} labels"
      )
    self.records = list(records)
    self.coco = dict(coco)
    self.label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
    self.class_names = tuple(class_names)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def category_id_to_label(self) -> dict[int, int]:
    return {c: l for l, c in self.label_to_category_id.items()}

  def __len__(self) -> int:
    return len(self.records)

  def __repr__(self) -> str:
    return (
      f"DetectionDataset({len(self)} images, {self.num_classes} classes, "
      f"{sum(len(r.labels) for r in self.records)} boxes)"
    )

  def load(self, index: int) -> dict[str, Any]:
    """Example ``index``: ``image`` uint8 [H,W,3], ``boxes`` float32 [n,4], ``labels``
    int32 [n], ``image_id`` int.

    Raises ``ValueError`` naming the file if the decoded image is not the record's
    ``height x width`` (its boxes, in the record's pixels, would be misaligned).
    """
    r = self.records[index]
    image = r.source if isinstance(r.source, np.ndarray) else read_image(r.source)
    if image.shape[:2] != (r.height, r.width):
      raise ValueError(_size_mismatch_message(r, image.shape[0], image.shape[1]))
    return {
      "image": image,
      "boxes": r.boxes,
      "labels": r.labels,
      "image_id": r.image_id,
    }

  def subset(self, indices: Sequence[int]) -> DetectionDataset:
    """The examples at ``indices``, with the ground truth restricted to them."""
    records = [self.records[int(i)] for i in indices]
    ids = {r.image_id for r in records}
    coco = dict(self.coco)
    coco["images"] = [copy.copy(im) for im in self.coco["images"] if im["id"] in ids]
    coco["annotations"] = [
      copy.copy(a) for a in self.coco["annotations"] if a["image_id"] in ids
    ]
    return DetectionDataset(
      records,
      coco,
      label_to_category_id=self.label_to_category_id,
      class_names=self.class_names,
    )
