"""Training, evaluation and checkpointing of detectors (``python -m jaxrank.train``).

Submodules are imported lazily: ``jaxrank.train.evaluation`` needs only numpy and
pycocotools, while :mod:`~jaxrank.train.trainer` needs flax, optax and orbax.
"""

from __future__ import annotations

import importlib

_LAZY = {
  "train": ("trainer", "train"),
  "TrainResult": ("trainer", "TrainResult"),
  "NonFiniteLossError": ("trainer", "NonFiniteLossError"),
  "TrainingInterrupted": ("trainer", "TrainingInterrupted"),
  "ConfigError": ("config", "ConfigError"),
  "base_config": ("config", "base_config"),
  "load_config_file": ("config", "load_config_file"),
  "apply_overrides": ("config", "apply_overrides"),
  "set_fields": ("config", "set_fields"),
  "Checkpointer": ("checkpoints", "Checkpointer"),
  "evaluate_checkpoint": ("trainer", "evaluate_checkpoint"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f"jaxrank.train.{module}"), attr)
  raise AttributeError(f"module 'jaxrank.train' has no attribute {name!r}")
