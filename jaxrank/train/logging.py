"""Metric logging: TensorBoard events (tensorboardX) and a JSON history.

``<workdir>/metrics.json`` holds ``{"train": [{"step", ...}], "eval": [{"step", ...}],
"final": {...}}``; it is rewritten atomically after every write, and a resumed run keeps
the entries up to its starting step. Only process 0 writes.
"""

from __future__ import annotations

import json
import logging as _pylogging
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

log = _pylogging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, (np.floating, float)):
    v = float(value)
    return v if math.isfinite(v) else None
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  return value


def write_json(path: str, data: Any) -> None:
  """Atomic JSON write (NaN/inf become null)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(_jsonable(data), f, indent=1)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class MetricWriter:
  """Scalars to TensorBoard and ``metrics.json``.

  Args:
    workdir: run folder.
    start_step: history entries after this step (from an interrupted run) are dropped.
    enabled: False on processes other than 0.
  """

  def __init__(self, workdir: str, *, start_step: int = 0, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.json")
    self.history: dict[str, Any] = {"train": [], "eval": [], "final": {}}
    self._tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      try:
        with open(self.path, encoding="utf-8") as f:
          old = json.load(f)
        self.history["train"] = [e for e in old.get("train", []) if e.get("step", 0) <= start_step]
        self.history["eval"] = [e for e in old.get("eval", []) if e.get("step", 0) <= start_step]
        self.history["nan_events"] = [
          e for e in old.get("nan_events", []) if e.get("step", 0) <= start_step
        ]
      except (OSError, ValueError) as e:
        log.warning("could not read %s (%s); starting a new history", self.path, e)
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step or None)

  def scalars(self, step: int, values: Mapping[str, Any], *, kind: str = "train") -> None:
    """Logs ``values`` (floats) at ``step`` under ``kind`` ('train' or 'eval')."""
    if not self.enabled:
      return
    entry = {"step": int(step)}
    for k, v in values.items():
      if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        entry[k] = float(v)
        if math.isfinite(float(v)):
          self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))
      else:
        entry[k] = v
    self.history.setdefault(kind, []).append(entry)
    self.flush()

  def event(self, kind: str, entry: Mapping[str, Any]) -> None:
    """Appends a free-form entry (e.g. a skipped non-finite step) to ``history[kind]``."""
    if not self.enabled:
      return
    self.history.setdefault(kind, []).append(dict(entry))
    self.flush()

  def text(self, tag: str, text: str, step: int) -> None:
    if self.enabled:
      self._tb.add_text(tag, f"```\n{text}\n```", int(step))

  def final(self, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    self.history["final"] = dict(values)
    self.flush()

  def flush(self) -> None:
    if not self.enabled:
      return
    write_json(self.path, self.history)
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self.flush()
      self._tb.close()
      self._tb = None


class NullProgressBar:
  """Stands in for a tqdm bar where none is shown."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix(self, *args, **kwargs) -> None:
    del args, kwargs

  def close(self) -> None:
    pass


def shows_progress_bar(enabled: bool) -> bool:
  """A tqdm bar is shown when ``enabled``, on process 0, with stderr a terminal (elsewhere
  the trainer writes text lines)."""
  return bool(enabled) and jax.process_index() == 0 and sys.stderr.isatty()


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0, leave: bool = True):
  """A tqdm bar (see :func:`shows_progress_bar`), else a :class:`NullProgressBar`."""
  if not shows_progress_bar(enabled):
    return NullProgressBar()
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, desc=desc, unit="step" if desc == "train" else "batch",
              dynamic_ncols=True, leave=leave, mininterval=1.0, smoothing=0.1)
