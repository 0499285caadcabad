"""Training configurations: the base config, config files, command-line overrides and checks.

A config file is a Python file with a ``get_config()`` (or ``get_config(arg)``, selected
with ``path.py:arg``) returning an ``ml_collections.ConfigDict`` with the sections

* ``model``: :func:`jaxrank.models.default_model_config` fields;
* ``loss``: :func:`jaxrank.models.recipes.default_loss_config` fields;
* ``data``, ``optimizer``, ``train``, ``eval``: see :func:`base_config`.

Overrides ``a.b=value`` are parsed according to the type of the current value
(``true``/``false`` for booleans, Python literals or comma-separated values for tuples)
and an unknown key or a value of the wrong type raises :class:`ConfigError` naming it.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """An invalid config file, override key or value."""


# ----------------------------------------------------------------------------------------
# Base config.


def _models():
  import jaxrank.models
  import jaxrank.models.recipes

  return jaxrank.models, jaxrank.models.recipes


def base_config() -> ConfigDict:
  """All sections with their defaults; config files start from this and change fields.

  ``model.image_size`` and ``model.num_classes`` are references to ``data.image_size``
  and ``data.num_classes``: override the ``data`` fields.
  """
  models, recipes = _models()
  c = ConfigDict()
  c.name = "experiment"

  c.data = ConfigDict()
  # 'synthetic' (built-in shapes), 'coco_folder' (images + instances JSON) or 'tfds'.
  c.data.source = "synthetic"
  c.data.image_size = 128  # square side S of the training and evaluation images.
  c.data.num_classes = 3  # synthetic: shape classes; COCO: 80 (checked against the data).
  c.data.max_boxes = 32  # ground-truth boxes kept per image (the largest ones).
  c.data.augment = "flip"  # 'none', 'flip' or 'ssd' (photometric, expand, min-IoU crop, flip).
  c.data.seed = 0  # synthetic images and augmentation.
  # Synthetic data.
  c.data.num_train = 2048
  c.data.num_val = 256
  c.data.synthetic_image_size = 0  # size of the drawn images (0: data.image_size).
  c.data.max_objects = 6
  c.data.min_object_size = 8
  c.data.max_object_size = 0  # 0: three quarters of the image side.
  # COCO folder (e.g. train2017/ + annotations/instances_train2017.json).
  c.data.train_images = ""
  c.data.train_annotations = ""
  c.data.val_images = ""
  c.data.val_annotations = ""
  c.data.on_corrupt = "raise"  # 'raise' or 'skip' undecodable / missing images.
  # TFDS coco/2017.
  c.data.tfds_data_dir = ""
  c.data.train_split = "train"
  c.data.val_split = "validation"
  c.data.max_val_images = 0  # evaluate on the first N validation images (0: all).
  c.data.num_workers = 0  # decoding threads per host (0: up to 4).
  c.data.prefetch = 2  # batches prepared ahead.

  c.model = models.default_model_config()
  c.model.image_size = c.data.get_ref("image_size")
  c.model.num_classes = c.data.get_ref("num_classes")

  c.loss = recipes.default_loss_config()

  c.optimizer = ConfigDict()
  c.optimizer.name = "sgd"  # 'sgd' or 'adamw'.
  # Learning rate at the reference batch size; the rate used is
  # lr * train.batch_size / lr_reference_batch_size (linear scaling rule, Goyal et al.
  # 2017). 0 turns the scaling off.
  c.optimizer.lr = 0.01
  c.optimizer.lr_reference_batch_size = 0
  c.optimizer.momentum = 0.9  # SGD momentum; AdamW b1.
  c.optimizer.nesterov = False
  c.optimizer.b2 = 0.999  # AdamW.
  c.optimizer.eps = 1e-8  # AdamW.
  # SGD: torch-style L2 (added to the gradient before momentum, as torch.optim.SGD);
  # AdamW: decoupled decay. Not applied to biases and normalisation scales when
  # decay_norm_and_bias is False.
  c.optimizer.weight_decay = 1e-4
  c.optimizer.decay_norm_and_bias = True
  c.optimizer.warmup_steps = 500  # linear warmup from warmup_ratio * lr.
  c.optimizer.warmup_ratio = 0.001
  c.optimizer.schedule = "step"  # 'step', 'cosine' or 'constant' after warmup.
  c.optimizer.decay_epochs = (8, 11)  # step schedule: epochs where lr *= decay_factor.
  c.optimizer.decay_steps = ()  # ... or steps (used when non-empty).
  c.optimizer.decay_factor = 0.1
  c.optimizer.min_lr_ratio = 0.0  # cosine: final lr / lr.
  c.optimizer.grad_clip_norm = 0.0  # clip_by_global_norm (0: off).

  c.train = ConfigDict()
  c.train.batch_size = 16  # global batch, over all hosts and devices.
  c.train.num_epochs = 12
  c.train.num_steps = 0  # > 0 overrides num_epochs.
  c.train.log_every = 10
  c.train.eval_every = 0  # steps (0: at the end only).
  c.train.checkpoint_every = 500  # steps (0: only at the end and on SIGTERM).
  c.train.keep_checkpoints = 3
  c.train.seed = 0  # parameter initialisation.
  c.train.nan_policy = "skip"  # 'skip' non-finite steps, or 'stop' the run.
  c.train.max_consecutive_nan_skips = 20  # 'skip': stop after this many in a row (0: never).
  # 'global': one ranking over the whole global batch; 'per_device': one per device (the
  # published per-GPU rankings; sets loss.ranking_groups to the number of devices).
  c.train.ranking = "global"
  # 'replicated' parameters and optimiser state on every device, or 'fsdp': large arrays
  # split over the 'data' axis (less memory per device; XLA gathers them per step).
  c.train.param_sharding = "replicated"
  c.train.progress_bar = True
  c.train.plots = True

  c.eval = ConfigDict()
  c.eval.batch_size = 16  # global.
  c.eval.score_threshold = 0.05
  c.eval.max_detections = 100
  c.eval.iou_threshold = 0.5
  c.eval.pre_nms_top_k = 1000
  c.eval.num_plot_images = 8  # validation images in the detections grid.
  return c


# ----------------------------------------------------------------------------------------
# Config files.


def load_config_file(spec: str) -> ConfigDict:
  """Config from ``path.py`` or ``path.py:arg`` (passed to ``get_config(arg)``)."""
  path, arg = spec, None
  if ":" in spec and not os.path.exists(spec):
    path, arg = spec.rsplit(":", 1)
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  name = "jaxrank_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:
    raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
  get_config = getattr(module, "get_config", None)
  if get_config is None:
    raise ConfigError(f"config file {path} has no get_config()")
  takes_arg = bool(inspect.signature(get_config).parameters)
  if arg is not None and not takes_arg:
    raise ConfigError(f"config file {path}: get_config() takes no argument, got {arg!r}")
  config = get_config(arg) if takes_arg else get_config()
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"config file {path}: get_config() returned {type(config).__name__}")
  return config


# ----------------------------------------------------------------------------------------
# Overrides.

_TRUE = ("true", "t", "yes", "y", "1", "on")
_FALSE = ("false", "f", "no", "n", "0", "off")


def _parse_scalar(text: str, like: Any, key: str) -> Any:
  if isinstance(like, bool):
    low = text.strip().lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ConfigError(f"config key {key!r}: expected a boolean (true/false), got {text!r}")
  if isinstance(like, int):
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = None
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
      raise ConfigError(f"config key {key!r}: expected an integer, got {text!r}")
    return value
  if isinstance(like, float):
    try:
      value = float(text)
    except ValueError:
      raise ConfigError(f"config key {key!r}: expected a number, got {text!r}") from None
    return value
  if isinstance(like, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_value(text: str, like: Any, key: str) -> Any:
  """``text`` parsed to the type of ``like`` (the field's current value)."""
  if isinstance(like, (tuple, list)):
    stripped = text.strip()
    if stripped in ("", "()", "[]"):
      return type(like)()
    try:
      value = ast.literal_eval(stripped)
    except (ValueError, SyntaxError):
      value = None
    if not isinstance(value, (tuple, list)):
      items = [s.strip() for s in stripped.strip("()[]").split(",") if s.strip()]
      if like:
        value = [_parse_scalar(s, like[0], key) for s in items]
      else:
        value = []
        for s in items:
          try:
            value.append(ast.literal_eval(s))
          except (ValueError, SyntaxError):
            raise ConfigError(
              f"config key {key!r}: cannot parse {text!r} (use comma-separated numbers or a "
              "Python literal such as (1, 2) or ('a', 'b'))"
            ) from None
    if like:
      elem = like[0]
      value = [_coerce(v, elem, key) for v in value]
    return type(like)(value)
  return _parse_scalar(text, like, key)


def _coerce(value: Any, like: Any, key: str) -> Any:
  if isinstance(like, bool) or isinstance(value, bool):
    if type(value) is not type(like):
      raise ConfigError(f"config key {key!r}: {value!r} is not a {type(like).__name__}")
    return value
  if isinstance(like, float) and isinstance(value, (int, float)):
    return float(value)
  if isinstance(like, int) and isinstance(value, int):
    return value
  if isinstance(like, str) and isinstance(value, str):
    return value
  if isinstance(like, (int, float, str)):
    raise ConfigError(f"config key {key!r}: {value!r} is not a {type(like).__name__}")
  return value


def _resolve_parent(config: ConfigDict, key: str) -> tuple[ConfigDict, str]:
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts[:-1]):
    if not isinstance(node, ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "<top level>"
      raise ConfigError(
        f"unknown config key {key!r}: {where} has no section {part!r}"
        f" (known: {', '.join(sorted(node.keys())) if isinstance(node, ConfigDict) else '-'})"
      )
    node = node[part]
  if not isinstance(node, ConfigDict):
    raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:-1])} is not a section")
  if parts[-1] not in node:
    raise ConfigError(
      f"unknown config key {key!r} (known in {'.'.join(parts[:-1]) or 'the top level'}: "
      f"{', '.join(sorted(node.keys()))})"
    )
  return node, parts[-1]


def apply_override(config: ConfigDict, key: str, text: str) -> None:
  """Sets ``config.<key>`` from the string ``text`` (see the module docstring)."""
  parent, leaf = _resolve_parent(config, key)
  current = parent[leaf]
  if isinstance(current, ConfigDict):
    raise ConfigError(f"config key {key!r} is a section; override its fields ({key}.FIELD=...)")
  value = parse_value(text, current, key)
  try:
    parent[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config key {key!r}: bad value {text!r}: {e}") from None


def apply_overrides(config: ConfigDict, overrides: Mapping[str, str] | Sequence[tuple[str, str]]):
  items = overrides.items() if isinstance(overrides, Mapping) else overrides
  for key, text in items:
    apply_override(config, key, text)
  return config


def set_fields(config: ConfigDict, updates: Mapping[str, Any]) -> ConfigDict:
  """Sets ``{"a.b": value}`` with Python values (typed like the current ones)."""
  for key, value in updates.items():
    parent, leaf = _resolve_parent(config, key)
    current = parent[leaf]
    if isinstance(value, str) and not isinstance(current, str):
      apply_override(config, key, value)
      continue
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
      value = type(current)(value)
    try:
      parent[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config key {key!r}: bad value {value!r}: {e}") from None
  return config


# ----------------------------------------------------------------------------------------
# Checks.

CHOICES = {
  "data.source": ("synthetic", "coco_folder", "tfds"),
  "data.augment": ("none", "flip", "ssd"),
  "data.on_corrupt": ("raise", "skip"),
  "optimizer.name": ("sgd", "adamw"),
  "optimizer.schedule": ("step", "cosine", "constant"),
  "train.nan_policy": ("skip", "stop"),
  "train.ranking": ("global", "per_device"),
  "train.param_sharding": ("replicated", "fsdp"),
}

POSITIVE = (
  "data.image_size", "data.num_classes", "data.max_boxes", "train.batch_size",
  "train.log_every", "eval.batch_size", "eval.max_detections", "eval.pre_nms_top_k",
  "train.keep_checkpoints",
)
NON_NEGATIVE = (
  "train.num_epochs", "train.num_steps", "train.eval_every", "train.checkpoint_every",
  "optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.grad_clip_norm",
  "optimizer.lr_reference_batch_size", "data.num_workers", "data.prefetch",
  "train.max_consecutive_nan_skips", "data.max_val_images",
)


def _get(config: ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def validate(config: ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first invalid field."""
  for section in ("model", "loss", "data", "optimizer", "train", "eval"):
    if section not in config or not isinstance(config[section], ConfigDict):
      raise ConfigError(f"config lacks the section {section!r}")
  for key, choices in CHOICES.items():
    value = _get(config, key)
    if value not in choices:
      raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(choices)}")
  for key in POSITIVE:
    value = _get(config, key)
    if not value > 0:
      raise ConfigError(f"config key {key!r} must be > 0, got {value!r}")
  for key in NON_NEGATIVE:
    value = _get(config, key)
    if not value >= 0:
      raise ConfigError(f"config key {key!r} must be >= 0, got {value!r}")
  if not (config.optimizer.lr > 0 and math.isfinite(config.optimizer.lr)):
    raise ConfigError(f"config key 'optimizer.lr' must be a positive number, got {config.optimizer.lr!r}")
  if not 0 < config.optimizer.warmup_ratio <= 1:
    raise ConfigError(
      f"config key 'optimizer.warmup_ratio' must be in (0, 1], got {config.optimizer.warmup_ratio!r}"
    )
  if config.train.num_epochs == 0 and config.train.num_steps == 0:
    raise ConfigError("set config key 'train.num_epochs' or 'train.num_steps' to a positive value")
  if config.model.image_size != config.data.image_size:
    raise ConfigError(
      f"config key 'model.image_size' ({config.model.image_size}) differs from "
      f"'data.image_size' ({config.data.image_size}); set data.image_size"
    )
  if config.model.num_classes != config.data.num_classes:
    raise ConfigError(
      f"config key 'model.num_classes' ({config.model.num_classes}) differs from "
      f"'data.num_classes' ({config.data.num_classes}); set data.num_classes"
    )
  if config.data.source == "coco_folder":
    for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
      if not config.data[key]:
        raise ConfigError(f"data.source='coco_folder' needs config key 'data.{key}'")
  if config.data.source == "synthetic" and (config.data.num_train < 1 or config.data.num_val < 1):
    raise ConfigError("config keys 'data.num_train' and 'data.num_val' must be >= 1")
  resolved = config.copy_and_resolve_references()
  models, recipes = _models()
  for section, check in (("model", models.check_model_config),
                         ("loss", recipes.check_loss_config)):
    try:
      check(resolved[section])
    except ValueError as e:
      msg = str(e).replace("model_config.", "model.").replace("loss_config.", "loss.")
      raise ConfigError(f"config section {section!r}: {msg}") from None
  steps = [s for s in config.optimizer.decay_steps]
  if sorted(steps) != steps:
    raise ConfigError(f"config key 'optimizer.decay_steps' must increase, got {steps}")
  epochs = [e for e in config.optimizer.decay_epochs]
  if sorted(epochs) != epochs:
    raise ConfigError(f"config key 'optimizer.decay_epochs' must increase, got {epochs}")


def to_dict(config: ConfigDict) -> dict[str, Any]:
  """JSON-able nested dict of the resolved config."""
  import json

  return json.loads(config.to_json_best_effort())


def from_dict(data: Mapping[str, Any]) -> ConfigDict:
  """Config rebuilt from :func:`to_dict` output (e.g. a run's ``config.json``): the base
  config updated with ``data``'s fields (unknown fields are added, tuples restored)."""
  config = base_config()

  def update(node: ConfigDict, values: Mapping[str, Any], prefix: str):
    for k, v in values.items():
      key = f"{prefix}{k}"
      if isinstance(v, Mapping):
        if k not in node:
          node[k] = ConfigDict()
        update(node[k], v, key + ".")
        continue
      if k in node and isinstance(node[k], tuple) and isinstance(v, list):
        v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
      if k in node:
        current = node[k]
        if isinstance(current, float) and isinstance(v, int) and not isinstance(v, bool):
          v = float(v)
        try:
          node[k] = v
        except TypeError:
          # A reference whose type changed, e.g. None default: replace the field.
          del node[k]
          node[k] = v
      else:
        node[k] = v

  update(config, data, "")
  return config
