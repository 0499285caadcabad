"""PNG plots of a run (matplotlib, Agg backend): loss curves, precision-recall curves and a
grid of validation images with predicted and ground-truth boxes."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxrank.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def pyplot():
  import matplotlib

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100, bbox_inches="tight")
  os.replace(tmp, path)
  return path


_NOT_LOSSES = ("lr", "img_per_s", "steps_per_s", "grad_norm", "skipped_steps", "epoch",
               "num_pos", "step_time", "skipped")


def plot_loss_curves(train_history: Sequence[Mapping[str, Any]], path: str,
                     eval_history: Sequence[Mapping[str, Any]] = ()) -> str | None:
  """Total and component losses against the step; the learning rate and, when given,
  the validation AP in side panels."""
  entries = [e for e in train_history if "loss" in e]
  if not entries:
    return None
  plt = pyplot()
  steps = np.array([e["step"] for e in entries])
  keys = [k for k in entries[-1] if k != "step" and ("loss" in k) and k not in _NOT_LOSSES
          and isinstance(entries[-1][k], (int, float))]
  keys = ["loss"] + sorted(k for k in keys if k != "loss")
  has_eval = any("AP" in e for e in eval_history)
  ncols = 3 if has_eval else 2
  fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4))
  ax = axes[0]
  for k in keys:
    y = np.array([e.get(k, np.nan) if e.get(k) is not None else np.nan for e in entries], float)
    ax.plot(steps, y, label=k, lw=2 if k == "loss" else 1)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title("training losses")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax = axes[1]
  if any("lr" in e for e in entries):
    ax.plot(steps, [e.get("lr", np.nan) for e in entries], color="tab:green")
  ax.set_xlabel("step")
  ax.set_title("learning rate")
  ax.grid(alpha=0.3)
  if has_eval:
    ax = axes[2]
    ev = [e for e in eval_history if "AP" in e]
    for k in ("AP", "AP50", "AP75"):
      ax.plot([e["step"] for e in ev], [e.get(k, np.nan) if e.get(k) is not None else np.nan
                                        for e in ev], marker="o", label=k)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.set_title("validation AP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  out = save_figure(fig, path)
  plt.close(fig)
  return out


def plot_pr_curve(pr_curve: Mapping[str, Any], path: str, *,
                  class_names: Sequence[str] | None = None, title: str = "") -> str:
  """Precision against recall at IoU 0.5: the class average and each class."""
  plt = pyplot()
  recall = np.asarray(pr_curve["recall"], float)
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  per_class = np.asarray(pr_curve.get("per_class_precision", []), float)
  if per_class.ndim == 2 and per_class.shape[0] <= 20:
    for k, prec in enumerate(per_class):
      if np.all(np.isnan(prec)):
        continue
      name = class_names[k] if class_names is not None and k < len(class_names) else str(k)
      ax.plot(recall, prec, lw=1, alpha=0.7, label=name)
  ax.plot(recall, np.asarray(pr_curve["precision"], float), color="black", lw=2.5,
          label="mean over classes")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("recall")
  ax.set_ylabel("precision")
  ax.set_title(title or "precision-recall at IoU 0.5")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower left")
  fig.tight_layout()
  out = save_figure(fig, path)
  plt.close(fig)
  return out


def denormalize(image: np.ndarray) -> np.ndarray:
  """uint8 RGB from a batch image: its pixels, or undone ImageNet mean/std normalisation."""
  if np.asarray(image).dtype == np.uint8:
    return np.asarray(image)
  return np.clip(np.asarray(image, np.float32) * IMAGENET_STD + IMAGENET_MEAN, 0, 255).astype(
    np.uint8)


def plot_detections_grid(
  images: np.ndarray,
  gt_boxes: np.ndarray,
  gt_labels: np.ndarray,
  gt_mask: np.ndarray,
  det_boxes: np.ndarray,
  det_scores: np.ndarray,
  det_classes: np.ndarray,
  det_valid: np.ndarray,
  path: str,
  *,
  class_names: Sequence[str] | None = None,
  min_score: float | None = None,
  title: str = "",
) -> str:
  """Images with ground truth (dashed green) and detections scoring >= ``min_score``
  (solid, coloured by class, labelled ``class score``). Coordinates are batch pixels.

  ``min_score`` None: the score of the k-th best detection of these images, k their number
  of ground-truth boxes (ranking losses leave scores uncalibrated, so a fixed threshold
  may show nothing or everything).
  """
  plt = pyplot()
  if min_score is None:
    scores = np.sort(np.asarray(det_scores)[np.asarray(det_valid, bool)])[::-1]
    k = int(np.sum(gt_mask))
    min_score = float(scores[min(k, len(scores)) - 1]) if len(scores) and k else 0.5
  n = len(images)
  cols = min(4, n)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
  cmap = plt.get_cmap("tab10")
  name = lambda c: class_names[c] if class_names is not None and c < len(class_names) else str(c)
  for i in range(rows * cols):
    ax = axes[i // cols][i % cols]
    ax.axis("off")
    if i >= n:
      continue
    ax.imshow(denormalize(images[i]))
    for box, _label, m in zip(gt_boxes[i], gt_labels[i], gt_mask[i]):
      if not m:
        continue
      x1, y1, x2, y2 = box
      ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1.5,
                                 ls="--"))
    for box, score, cls, v in zip(det_boxes[i], det_scores[i], det_classes[i], det_valid[i]):
      if not v or score < min_score:
        continue
      x1, y1, x2, y2 = box
      color = cmap(int(cls) % 10)
      ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=color, lw=1.5))
      ax.text(x1, y1, f"{name(int(cls))} {score:.2f}", color="white", fontsize=6,
              va="bottom", bbox=dict(facecolor=color, alpha=0.7, pad=0.5, lw=0))
  fig.suptitle(f"{title + ': ' if title else ''}ground truth dashed green, detections with "
               f"score >= {min_score:.3g}", fontsize=9)
  fig.tight_layout()
  out = save_figure(fig, path)
  plt.close(fig)
  return out
