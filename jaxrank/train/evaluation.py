"""COCO box evaluation with pycocotools.

Detections come from batches in resized-image pixels; :func:`detections_to_coco_results`
maps them back to original image coordinates and COCO category ids, and
:func:`evaluate_coco` scores them against a COCO-format ground-truth dict.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_STAT_NAMES = (
  "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"
)


def detections_to_coco_results(
  image_ids: Any,
  boxes: Any,
  scores: Any,
  classes: Any,
  valid: Any,
  scales: Any,
  label_to_category_id: Mapping[int, int] | Sequence[int],
) -> list[dict[str, Any]]:
  """COCO result dicts from batched detections.

  Args:
    image_ids: ``[B]`` image ids.
    boxes: ``[B, K, 4]`` xyxy boxes in resized-image pixels.
    scores: ``[B, K]`` confidences.
    classes: ``[B, K]`` labels ``0..C-1``; negative marks an empty detection slot.
    valid: ``[B]`` False for padding examples, which are skipped.
    scales: ``[B]`` resize factors (``resized = original * scale``).
    label_to_category_id: label -> COCO category id.

  Returns:
    ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` dicts, boxes in
    original image coordinates. Non-finite scores and slots with negative classes are
    skipped.
  """
  image_ids = np.asarray(image_ids).reshape(-1)
  boxes = np.asarray(boxes, np.float64)
  scores = np.asarray(scores, np.float64)
  classes = np.asarray(classes)
  valid = np.asarray(valid, bool).reshape(-1)
  scales = np.asarray(scales, np.float64).reshape(-1)
  b = len(image_ids)
  if boxes.shape[:1] != (b,) or boxes.shape[-1] != 4 or boxes.ndim != 3:
    raise ValueError(f"boxes must be [B={b}, K, 4], got {boxes.shape}")
  if scores.shape != boxes.shape[:2] or classes.shape != boxes.shape[:2]:
    raise ValueError(
      f"scores {scores.shape} and classes {classes.shape} must be {boxes.shape[:2]}"
    )
  if valid.shape != (b,) or scales.shape != (b,):
    raise ValueError(f"valid {valid.shape} and scales {scales.shape} must be ({b},)")
  results = []
  for i in np.flatnonzero(valid):
    if not scales[i] > 0:
      raise ValueError(f"scale of image {image_ids[i]} must be positive, got {scales[i]}")
    keep = (classes[i] >= 0) & np.isfinite(scores[i]) & np.all(np.isfinite(boxes[i]), -1)
    xyxy = boxes[i][keep] / scales[i]
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], -1)
    image_id = int(image_ids[i])
    for box, score, label in zip(xywh.tolist(), scores[i][keep].tolist(), classes[i][keep]):
      results.append(
        {
          "image_id": image_id,
          "category_id": int(label_to_category_id[int(label)]),
          "bbox": [round(v, 3) for v in box],
          "score": float(score),
        }
      )
  return results


def write_coco_results(path: str | os.PathLike, results: Sequence[Mapping[str, Any]]) -> None:
  """Writes COCO results as JSON (the format of COCO's test server)."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(list(results), f)


def _coco_from_dict(data: Mapping[str, Any]):
  from pycocotools.coco import COCO

  coco = COCO()
  coco.dataset = copy.deepcopy(dict(data))
  for a in coco.dataset["annotations"]:
    a.setdefault("iscrowd", 0)
    a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _mean_valid(x: np.ndarray) -> float:
  x = x[x > -1]
  return float(x.mean()) if x.size else float("nan")


def evaluate_coco(
  gt_coco: Mapping[str, Any],
  results: Sequence[Mapping[str, Any]],
  *,
  class_names: Sequence[str] | None = None,
  image_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
  """COCO box metrics of ``results`` against the ground truth ``gt_coco``.

  Args:
    gt_coco: COCO-format ground truth (``images``, ``annotations``, ``categories``).
    results: COCO result dicts (see :func:`detections_to_coco_results`).
    class_names: names for ``per_class_AP`` in category id order (default: the
      categories' names).
    image_ids: evaluate only these images (default: all of ``gt_coco``).

  Returns:
    ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` and ``AR1`` ... ``ARl``
    (floats in [0, 1], NaN where the ground truth has no object of that kind),
    ``per_class_AP`` ``{name: AP}``, ``pr_curve`` ``{"recall": [101], "precision": [101],
    "per_class_precision": [C, 101]}`` at IoU 0.5 (area all, 100 detections; precision
    averaged over classes with ground truth), and ``summary``, pycocotools' text.
  """
  from pycocotools.cocoeval import COCOeval

  gt = _coco_from_dict(gt_coco)
  known = set(gt.getImgIds())
  unknown = {r["image_id"] for r in results} - known
  if unknown:
    raise ValueError(
      f"{len(unknown)} result image ids are not in the ground truth, e.g. {sorted(unknown)[:5]}"
    )
  cat_ids = sorted(gt.getCatIds())
  names = [gt.cats[c]["name"] for c in cat_ids] if class_names is None else list(class_names)
  if len(names) != len(cat_ids):
    raise ValueError(f"{len(names)} class names for {len(cat_ids)} categories")

  with contextlib.redirect_stdout(io.StringIO()):
    if results:
      dt = gt.loadRes([dict(r) for r in results])
    else:
      dt = _coco_from_dict(
        {"images": gt.dataset["images"], "annotations": [], "categories": gt.dataset["categories"]}
      )
    ev = COCOeval(gt, dt, iouType="bbox")
    if image_ids is not None:
      ev.params.imgIds = sorted(int(i) for i in image_ids)
    ev.evaluate()
    ev.accumulate()
  summary = io.StringIO()
  with contextlib.redirect_stdout(summary):
    ev.summarize()

  stats = [float(s) if s > -1 else float("nan") for s in ev.stats]
  metrics: dict[str, Any] = dict(zip(_STAT_NAMES, stats))
  # precision: [T iou thresholds, R recall points, K classes, A areas, M max dets].
  precision = ev.eval["precision"]
  metrics["per_class_AP"] = {
    name: _mean_valid(precision[:, :, k, 0, -1]) for k, name in enumerate(names)
  }
  at50 = precision[0, :, :, 0, -1].T
  has_gt = np.any(at50 > -1, axis=1)
  metrics["pr_curve"] = {
    "recall": np.asarray(ev.params.recThrs, np.float64),
    "precision": (
      np.clip(at50[has_gt], 0.0, None).mean(0) if has_gt.any() else np.zeros(at50.shape[1])
    ),
    "per_class_precision": np.where(at50 > -1, at50, np.nan),
  }
  metrics["summary"] = summary.getvalue().rstrip()
  return metrics
