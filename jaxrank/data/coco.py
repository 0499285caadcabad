"""COCO 2017-style datasets: a local image folder plus an instances JSON file, or TFDS.

:func:`load_coco_folder` validates the annotation file and reads images lazily. Boxes
are clipped to their image; boxes empty after clipping, with negative size or with
non-finite coordinates are dropped and counted in a logged warning. Images without
annotations are kept as negatives. Category ids become contiguous labels ``0..C-1`` in
increasing id order; the dataset keeps the map back for evaluation.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
from typing import Any, Literal

import numpy as np

from jaxrank.data.dataset import DetectionDataset, Record, SourceImage

log = logging.getLogger(__name__)

_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
_CATEGORY_KEYS = ("id", "name")


def _require(entry: Any, keys: tuple[str, ...], where: str, path: str) -> None:
  if not isinstance(entry, dict):
    raise ValueError(f"{path}: {where} is a {type(entry).__name__}, not an object")
  for key in keys:
    if key not in entry:
      raise ValueError(f"{path}: {where} lacks the key {key!r}")


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: malformed JSON: {e}") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not a UTF-8 JSON file: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: top level is a {type(data).__name__}, not an object")
  for key in ("images", "annotations", "categories"):
    if key not in data:
      raise ValueError(f"{path}: lacks the top-level key {key!r}")
    if not isinstance(data[key], list):
      raise ValueError(f"{path}: {key!r} is a {type(data[key]).__name__}, not a list")
  return data


def _is_integer(value: Any) -> bool:
  """Whether ``value`` is an integral JSON number (not a string or a bool)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  return isinstance(value, int) or value.is_integer()


def _is_positive_integer(value: Any) -> bool:
  return _is_integer(value) and value > 0


def _integer_field(entry: dict[str, Any], key: str, where: str, path: str) -> int:
  """``entry[key]`` as an int; raises ``ValueError`` naming the entry and the field unless
  it is an integral JSON number (COCO ids are integers)."""
  value = entry[key]
  if not _is_integer(value):
    raise ValueError(f"{path}: {where} has a non-integer {key!r}: {value!r}")
  return int(value)


def _check_image_file(
  path: str, width: int | None = None, height: int | None = None
) -> str | None:
  """Why the file at ``path`` is not a readable image of ``width x height`` pixels (when
  given), or None if its header is fine. Reads the header only."""
  from PIL import Image

  try:
    with Image.open(path) as img:
      size = img.size
      img.verify()
  except FileNotFoundError:
    return "file not found"
  except Exception as e:  # PIL raises many types for damaged files.
    return f"{type(e).__name__}: {e}"
  if width is not None and height is not None and size != (width, height):
    return (
      f"the annotation file gives its size as {width}x{height} (width x height) but the "
      f"image is {size[0]}x{size[1]}"
    )
  return None


def clip_coco_box(
  bbox: Any, width: float, height: float
) -> tuple[np.ndarray | None, str | None]:
  """Clips a COCO ``[x, y, w, h]`` box to the image.

  Returns ``(xyxy box, None)``, or ``(None, reason)`` for a box that must be dropped.
  ``reason`` is one of ``malformed``, ``non-finite``, ``negative size``, ``zero area``
  and ``outside image``.
  """
  if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
    return None, "malformed"
  try:
    x, y, w, h = (float(v) for v in bbox)
  except (TypeError, ValueError):
    return None, "malformed"
  if not all(math.isfinite(v) for v in (x, y, w, h)):
    return None, "non-finite"
  if w < 0 or h < 0:
    return None, "negative size"
  if w == 0 or h == 0:
    return None, "zero area"
  x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
  x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
  if x2 <= x1 or y2 <= y1:
    return None, "outside image"
  return np.array([x1, y1, x2, y2], np.float32), None


def load_coco_folder(
  image_dir: str | os.PathLike,
  annotation_file: str | os.PathLike,
  *,
  skip_crowd: bool = True,
  on_corrupt: Literal["raise", "skip"] = "raise",
) -> DetectionDataset:
  """A COCO-style folder (e.g. ``val2017/`` + ``instances_val2017.json``).

  Args:
    image_dir: folder holding the images named by ``file_name``.
    annotation_file: COCO instances JSON.
    skip_crowd: leave ``iscrowd`` boxes out of the training targets (they stay in the
      evaluation ground truth, where COCO ignores detections matching them).
    on_corrupt: ``"raise"``: an undecodable image raises ``CorruptImageError``, and an
      image whose decoded size differs from the JSON ``width``/``height`` raises
      ``ValueError``, naming the file when it is loaded (its boxes would be misaligned).
      ``"skip"``: every image header is checked now, and missing or unreadable images,
      and images whose size differs from the JSON, are dropped with a warning.

  Raises:
    FileNotFoundError: ``image_dir`` or ``annotation_file`` does not exist.
    ValueError: malformed JSON, a missing key, a non-integer image, category or
      annotation image/category id, duplicate image ids, or an annotation naming an
      unknown image or category.
  """
  image_dir, annotation_file = os.fspath(image_dir), os.fspath(annotation_file)
  if on_corrupt not in ("raise", "skip"):
    raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"COCO image folder not found: {image_dir}")
  if not os.path.isfile(annotation_file):
    raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
  data = _read_json(annotation_file)

  categories = []
  for i, c in enumerate(data["categories"]):
    _require(c, _CATEGORY_KEYS, f"categories[{i}]", annotation_file)
    categories.append({**c, "id": _integer_field(c, "id", f"categories[{i}]", annotation_file)})
  categories.sort(key=lambda c: c["id"])
  category_ids = [c["id"] for c in categories]
  if len(set(category_ids)) != len(category_ids):
    raise ValueError(f"{annotation_file}: duplicate category ids")
  category_to_label = {c: l for l, c in enumerate(category_ids)}

  images: dict[int, dict[str, Any]] = {}
  for i, im in enumerate(data["images"]):
    _require(im, _IMAGE_KEYS, f"images[{i}]", annotation_file)
    image_id = _integer_field(im, "id", f"images[{i}]", annotation_file)
    if image_id in images:
      raise ValueError(f"{annotation_file}: duplicate image id {image_id}")
    if not (_is_positive_integer(im["width"]) and _is_positive_integer(im["height"])):
      raise ValueError(
        f"{annotation_file}: image {image_id} has an invalid size "
        f"{im['width']!r} x {im['height']!r} (width and height must be positive integers)"
      )
    images[image_id] = {
      **im, "id": image_id, "width": int(im["width"]), "height": int(im["height"])
    }

  skipped_ids: set[int] = set()
  if on_corrupt == "skip":
    for image_id, im in images.items():
      path = os.path.join(image_dir, im["file_name"])
      reason = _check_image_file(path, im["width"], im["height"])
      if reason is not None:
        skipped_ids.add(image_id)
        log.warning("skipping image %s: %s", path, reason)
    if skipped_ids:
      log.warning("skipped %d of %d unreadable or mis-sized images", len(skipped_ids), len(images))
      images = {k: v for k, v in images.items() if k not in skipped_ids}

  per_image: dict[int, list[tuple[np.ndarray, int]]] = collections.defaultdict(list)
  gt_annotations = []
  dropped: collections.Counter[str] = collections.Counter()
  clipped = 0
  crowd = 0
  for i, a in enumerate(data["annotations"]):
    _require(a, _ANNOTATION_KEYS, f"annotations[{i}]", annotation_file)
    image_id = _integer_field(a, "image_id", f"annotations[{i}]", annotation_file)
    category_id = _integer_field(a, "category_id", f"annotations[{i}]", annotation_file)
    if image_id in skipped_ids:
      continue
    if image_id not in images:
      raise ValueError(f"{annotation_file}: annotation {a['id']} names unknown image {image_id}")
    if category_id not in category_to_label:
      raise ValueError(
        f"{annotation_file}: annotation {a['id']} names unknown category {category_id}"
      )
    im = images[image_id]
    box, reason = clip_coco_box(a["bbox"], float(im["width"]), float(im["height"]))
    if box is None:
      dropped[reason] += 1
      continue
    x1, y1, x2, y2 = box.tolist()
    xywh = [x1, y1, x2 - x1, y2 - y1]
    if not np.allclose(xywh, [float(v) for v in a["bbox"]], atol=1e-3):
      clipped += 1
    is_crowd = bool(a.get("iscrowd", 0))
    area = a.get("area")
    if not isinstance(area, (int, float)) or not area > 0:
      area = xywh[2] * xywh[3]
    gt_annotations.append({
      **a,
      "image_id": image_id,
      "category_id": category_id,
      "bbox": xywh,
      "area": float(area),
      "iscrowd": int(is_crowd),
    })
    if is_crowd:
      crowd += 1
      if skip_crowd:
        continue
    per_image[image_id].append((box, category_to_label[category_id]))

  if dropped:
    log.warning(
      "%s: dropped %d invalid boxes (%s)",
      annotation_file,
      sum(dropped.values()),
      ", ".join(f"{n} {r}" for r, n in sorted(dropped.items())),
    )
  if clipped:
    log.warning("%s: clipped %d boxes to their image", annotation_file, clipped)

  records = []
  for image_id, im in images.items():
    objs = per_image.get(image_id, [])
    boxes = np.stack([b for b, _ in objs]) if objs else np.zeros((0, 4), np.float32)
    labels = np.array([l for _, l in objs], np.int32)
    records.append(
      Record(
        image_id=image_id,
        width=int(im["width"]),
        height=int(im["height"]),
        boxes=boxes.astype(np.float32),
        labels=labels,
        source=os.path.join(image_dir, im["file_name"]),
      )
    )
  log.info(
    "%s: %d images (%d without boxes), %d boxes, %d crowd",
    annotation_file,
    len(records),
    sum(1 for r in records if len(r.labels) == 0),
    sum(len(r.labels) for r in records),
    crowd,
  )
  coco = {
    "info": data.get("info", {}),
    "images": list(images.values()),
    "annotations": gt_annotations,
    "categories": categories,
  }
  return DetectionDataset(
    records,
    coco,
    label_to_category_id={l: c for c, l in category_to_label.items()},
    class_names=[str(c["name"]) for c in categories],
  )


def load_tfds_coco(
  split: str, *, data_dir: str | None = None, skip_crowd: bool = True, name: str = "coco/2017"
) -> DetectionDataset:
  """COCO 2017 from TensorFlow Datasets (``coco/2017``, or ``name`` with its features).

  Needs the ``[coco]`` extra (``pip install 'jaxrank[coco]'``). TFDS labels 0..79 follow the
  official category id order, so they map back to the official ids. The examples are read
  once for their boxes. If the dataset was prepared in a random-access format
  (``tfds build coco/2017 --file_format=array_record``), the images stay in TFDS's data
  source and are read when loaded (each loader process opens the files itself); otherwise
  (TFRecord, the default) the encoded images are kept in memory (about 19 GB for train2017,
  copied to every loader process), with a logged warning.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
      "load_tfds_coco needs tensorflow_datasets; install the [coco] extra: "
      "pip install 'jaxrank[coco]'"
    ) from e

  decoders = {"image": tfds.decode.SkipDecoding()}
  builder = tfds.builder(name, data_dir=data_dir)
  try:
    source = builder.as_data_source(split=split, decoders=decoders)
  except (NotImplementedError, ValueError) as e:  # not prepared in a random-access format
    log.warning("TFDS %s has no random-access files (%s); keeping its encoded images in "
                "memory. Prepare it with --file_format=array_record to read them on load.",
                name, str(e).splitlines()[0])
    examples = ((None, ex) for ex in tfds.as_numpy(tfds.load(
      name, split=split, data_dir=data_dir, decoders=decoders)))
  else:
    examples = ((SourceImage(source, i), source[i]) for i in range(len(source)))
  info = builder.info
  names = list(info.features["objects"]["label"].names)
  official_ids = [i for i in range(1, 91) if i not in _COCO_MISSING_IDS]
  if len(names) != len(official_ids):
    raise ValueError(f"expected 80 COCO classes from TFDS, got {len(names)}")
  records, images, annotations = [], [], []
  for reference, ex in examples:
    encoded = bytes(ex["image"])
    h, w = (int(v) for v in _jpeg_size(encoded))
    image_id = int(ex["image/id"])
    objs = ex["objects"]
    ymin, xmin, ymax, xmax = np.asarray(objs["bbox"], np.float32).reshape(-1, 4).T
    boxes = np.stack([xmin * w, ymin * h, xmax * w, ymax * h], -1).astype(np.float32)
    labels = np.asarray(objs["label"], np.int32)
    crowd = np.asarray(objs["is_crowd"], bool)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    for box, label, c, k, area in zip(boxes, labels, crowd, keep, objs["area"]):
      if k:
        x1, y1, x2, y2 = box.tolist()
        annotations.append(
          {
            "id": len(annotations) + 1,
            "image_id": image_id,
            "category_id": official_ids[int(label)],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float(area),
            "iscrowd": int(c),
          }
        )
    train_keep = keep & ~crowd if skip_crowd else keep
    records.append(Record(image_id, w, h, boxes[train_keep], labels[train_keep],
                          encoded if reference is None else reference))
    images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h})
  coco = {
    "images": images,
    "annotations": annotations,
    "categories": [{"id": c, "name": n} for c, n in zip(official_ids, names)],
  }
  return DetectionDataset(
    records,
    coco,
    label_to_category_id=dict(enumerate(official_ids)),
    class_names=names,
  )


def _jpeg_size(encoded: bytes) -> tuple[int, int]:
  """``(height, width)`` of an encoded image, read from its header."""
  import io

  from PIL import Image

  with Image.open(io.BytesIO(encoded)) as img:
    return img.height, img.width


_COCO_MISSING_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
