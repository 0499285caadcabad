"""Detections on image files: ``python -m jaxrank.predict --workdir RUN PATH...``.

``PATH`` is an image file or a folder (its image files, not recursive, by name). For each
image it writes ``<out>/<stem>.png``, the image with its boxes, class names and scores drawn
(the ``--max_drawn`` best), and for all of them one ``<out>/detections.json`` in the COCO
results format plus ``file_name`` and ``class_name``: ``image_id`` is the image's 1-based
position in the processed order, ``category_id`` is the 0-based label + 1 (the category
ids of the built-in and COCO-folder training data, in ``class_names.json`` order), ``bbox``
is ``[x, y, w, h]`` in the original image's pixels. ``--out`` defaults to
``<workdir>/predictions``. ``--workdir`` may also be an export folder
(``python -m jaxrank.export``).

An image that cannot be read is reported (naming the file) and skipped; the others are
still written. Exit status: 0 all images done, 1 bad input (a missing or unreadable image,
a folder without images, a workdir that is not a run or export), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# tab10, as the training plots colour classes.
_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


class InputError(ValueError):
  """A path that names no usable image."""


def _non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
  return value


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
  return value


def _finite_float(text: str) -> float:
  value = float(text)
  if not np.isfinite(value):
    raise argparse.ArgumentTypeError(f"must be finite, got {text}")
  return value


def _unit_float(text: str) -> float:
  value = _finite_float(text)
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m jaxrank.predict",
    description="Runs a trained detector on image files; writes annotated PNGs and a COCO "
                "results detections.json.")
  parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
  parser.add_argument("--workdir", required=True,
                      help="training run folder or export folder (python -m jaxrank.export)")
  parser.add_argument("--out", default=None, help="output folder (default WORKDIR/predictions)")
  parser.add_argument("--step", type=_non_negative_int, default=None,
                      help="checkpoint step of the run (default: the latest readable one)")
  parser.add_argument("--score_threshold", type=_finite_float, default=None,
                      help="keep detections scoring at least this (default: the run's eval)")
  parser.add_argument("--max_detections", type=_positive_int, default=None,
                      help="detections kept per image (default: the run's eval)")
  parser.add_argument("--iou_threshold", type=_unit_float, default=None,
                      help="NMS IoU threshold (default: the run's eval)")
  parser.add_argument("--max_drawn", type=_non_negative_int, default=20,
                      help="best detections drawn per image (0: all kept; default 20); "
                           "detections.json has all of them")
  return parser


def find_images(paths: Sequence[str]) -> list[str]:
  """The image files of ``paths`` (files as given; folders: their image files by name).
  Raises :class:`InputError` naming a missing path or a folder without images."""
  images = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, n) for n in os.listdir(path)
                     if n.lower().endswith(IMAGE_EXTENSIONS)
                     and os.path.isfile(os.path.join(path, n)))
      if not found:
        raise InputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
      images.extend(found)
    elif os.path.exists(path):
      images.append(path)
    else:
      raise InputError(f"image file not found: {path}")
  return images


def output_names(files: Sequence[str]) -> list[str]:
  """``<stem>.png`` for each file; repeated stems get ``_<n>`` (their 1-based position)."""
  stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
  return [f"{s}.png" if stems.count(s) == 1 else f"{s}_{i + 1}.png" for i, s in enumerate(stems)]


def draw_detections(image: np.ndarray, prediction: dict, path: str, *, max_drawn: int = 0) -> str:
  """Writes ``image`` with the ``max_drawn`` best boxes (0: all), labelled ``class score``,
  to the PNG ``path``."""
  from PIL import Image, ImageDraw, ImageFont

  canvas = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  width = max(1, round(max(canvas.size) / 300))
  count = len(prediction["scores"]) if max_drawn <= 0 else min(max_drawn,
                                                              len(prediction["scores"]))
  # Lowest score first, so the best boxes are drawn on top.
  for i in reversed(range(count)):
    x1, y1, x2, y2 = (float(v) for v in prediction["boxes"][i])
    color = _COLORS[int(prediction["classes"][i]) % len(_COLORS)]
    draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
    label = f"{prediction['class_names'][i]} {float(prediction['scores'][i]):.2f}"
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    text_y = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
    draw.rectangle((x1, text_y, x1 + right - left + 2, text_y + bottom - top + 2), fill=color)
    draw.text((x1 + 1, text_y - top + 1), label, fill=(255, 255, 255), font=font)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  canvas.save(path, format="PNG")
  return path


def coco_results(prediction: dict, *, image_id: int, file_name: str) -> list[dict]:
  """One image's detections as COCO results (``category_id`` = label + 1)."""
  results = []
  for box, score, label, name in zip(prediction["boxes"].tolist(), prediction["scores"].tolist(),
                                     prediction["classes"].tolist(), prediction["class_names"]):
    x1, y1, x2, y2 = box
    results.append({"file_name": file_name, "image_id": image_id, "category_id": int(label) + 1,
                    "class_name": name, "bbox": [round(x1, 2), round(y1, 2),
                                                 round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(float(score), 5)})
  return results


def _error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # argparse: bad arguments (2) or --help (0)
    return int(e.code or 0)

  try:
    files = find_images(args.paths)
  except InputError as e:
    _error(str(e))
    return 1

  from jaxrank.data import read_image
  from jaxrank.inference import load_detector

  try:
    detector = load_detector(args.workdir, step=args.step)
  except (FileNotFoundError, ValueError) as e:
    _error(str(e))
    return 1
  try:
    post = detector.post_options(score_threshold=args.score_threshold,
                                 max_detections=args.max_detections,
                                 iou_threshold=args.iou_threshold)
  except ValueError as e:
    _error(str(e))
    return 2
  out_dir = os.path.abspath(args.out or os.path.join(detector.path, "predictions"))
  os.makedirs(out_dir, exist_ok=True)
  print(f"{detector}: {len(files)} images -> {out_dir}")

  results, failed = [], []
  for image_id, (file, out_name) in enumerate(zip(files, output_names(files)), start=1):
    try:
      image = read_image(file)
    except (OSError, ValueError) as e:  # CorruptImageError is a ValueError
      _error(str(e))
      failed.append(file)
      continue
    prediction = detector.predict(image, **post)
    draw_detections(image, prediction, os.path.join(out_dir, out_name), max_drawn=args.max_drawn)
    results.extend(coco_results(prediction, image_id=image_id, file_name=file))
    print(f"{file}: {len(prediction['scores'])} detections -> {out_name}")

  detections_path = os.path.join(out_dir, "detections.json")
  with open(detections_path, "w", encoding="utf-8") as f:
    json.dump(results, f)
  print(f"{len(results)} detections of {len(files) - len(failed)} images -> {detections_path}")
  if failed:
    _error(f"{len(failed)} of {len(files)} images could not be read: {', '.join(failed)}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
