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

from jaxrank import models
from jaxrank.validation import ConfigError, Section

ConfigDict = ml_collections.ConfigDict
__all__ = ["ConfigDict", "ConfigError", "apply_override", "apply_overrides", "base_config",
           "from_dict", "load_config_file", "parse_value", "set_fields", "to_dict", "validate"]


# ----------------------------------------------------------------------------------------
# Base config.


def base_config() -> ConfigDict:
  """All sections with their defaults; config files start from this and change fields.

  ``model.image_size`` and ``model.num_classes`` are references to ``data.image_size``
  and ``data.num_classes``: override the ``data`` fields.
  """
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
  c.data.num_workers = 2  # loader processes per host (0: in the training process, to debug).
  c.data.prefetch = 2  # batches each loader process prepares ahead.

  c.model = models.default_model_config("retinanet")
  c.model.image_size = c.data.get_ref("image_size")
  c.model.num_classes = c.data.get_ref("num_classes")

  c.loss = models.family_of(c.model).default_loss_config("focal_smooth_l1")

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
  # (pattern, multiplier) pairs: parameters whose path contains the pattern train at
  # multiplier * lr (first match wins), e.g. (("backbone", 0.1),).
  c.optimizer.lr_multipliers = ()

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
  try:
    config = get_config(arg) if takes_arg else get_config()
  except ConfigError:
    raise
  except Exception as e:
    what = f"get_config({arg!r})" if takes_arg else "get_config()"
    raise ConfigError(f"config file {path}: {what} failed: {type(e).__name__}: {e}") from e
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

SECTIONS = ("model", "loss", "data", "optimizer", "train", "eval")


def _check_data(data: Section) -> None:
  source = data.choice("source", ("synthetic", "coco_folder", "tfds"))
  data.choice("augment", ("none", "flip", "ssd"))
  data.choice("on_corrupt", ("raise", "skip"))
  for key in ("image_size", "num_classes", "max_boxes"):
    data.integer(key, min=1)
  for key in ("num_workers", "prefetch", "max_val_images", "seed", "synthetic_image_size",
              "max_object_size"):
    data.integer(key, min=0)
  data.integer("max_objects", min=1)
  data.integer("min_object_size", min=1)
  if source == "synthetic":
    data.integer("num_train", min=1)
    data.integer("num_val", min=1)
  if source == "coco_folder":
    for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
      if not data.string(key):
        raise data.error(key, "must be set for data.source='coco_folder'")


def _check_optimizer(opt: Section) -> None:
  opt.choice("name", ("sgd", "adamw"))
  opt.choice("schedule", ("step", "cosine", "constant"))
  opt.number("lr", above=0.0)
  opt.integer("lr_reference_batch_size", min=0)
  opt.number("momentum", min=0.0, below=1.0)
  opt.boolean("nesterov")
  opt.number("b2", min=0.0, below=1.0)
  opt.number("eps", above=0.0)
  opt.number("weight_decay", min=0.0)
  opt.boolean("decay_norm_and_bias")
  opt.integer("warmup_steps", min=0)
  opt.number("warmup_ratio", above=0.0, max=1.0)
  opt.numbers("decay_epochs", min=0.0, increasing=True, allow_empty=True)
  opt.numbers("decay_steps", min=0.0, increasing=True, allow_empty=True)
  opt.number("decay_factor", above=0.0, max=1.0)
  opt.number("min_lr_ratio", min=0.0, max=1.0)
  opt.number("grad_clip_norm", min=0.0)
  pairs = opt.config["lr_multipliers"]
  if isinstance(pairs, (str, bytes)) or not isinstance(pairs, (tuple, list)):
    raise opt.error("lr_multipliers", f"must be a tuple of (pattern, multiplier) pairs, got "
                                      f"{pairs!r}")
  for pair in pairs:
    ok = (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
          and pair[0] and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)
          and math.isfinite(pair[1]) and pair[1] >= 0)
    if not ok:
      raise opt.error("lr_multipliers", f"must hold (non-empty pattern, finite multiplier "
                                        f">= 0) pairs, got {pair!r}")


def _check_train(train: Section) -> None:
  for key in ("batch_size", "log_every", "keep_checkpoints"):
    train.integer(key, min=1)
  for key in ("num_epochs", "num_steps", "eval_every", "checkpoint_every", "seed",
              "max_consecutive_nan_skips"):
    train.integer(key, min=0)
  train.choice("nan_policy", ("skip", "stop"))
  train.choice("ranking", ("global", "per_device"))
  train.choice("param_sharding", ("replicated", "fsdp"))
  train.boolean("progress_bar")
  train.boolean("plots")
  if train.config["num_epochs"] == 0 and train.config["num_steps"] == 0:
    raise train.error("num_steps", "or 'train.num_epochs' must be positive")


def _check_eval(ev: Section) -> None:
  for key in ("batch_size", "max_detections", "pre_nms_top_k"):
    ev.integer(key, min=1)
  ev.integer("num_plot_images", min=0)
  ev.number("score_threshold", min=0.0, max=1.0)
  ev.number("iou_threshold", min=0.0, max=1.0)


def validate(config: ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first invalid field."""
  for section in SECTIONS:
    if section not in config or not isinstance(config[section], ConfigDict):
      raise ConfigError(f"config lacks the section {section!r}")
  base = base_config()
  for section, check in (("data", _check_data), ("optimizer", _check_optimizer),
                         ("train", _check_train), ("eval", _check_eval)):
    fields = Section(config[section], section)
    fields.fields(base[section].keys())
    check(fields)
  for field in ("image_size", "num_classes"):
    if config.model.get(field) != config.data[field]:
      raise ConfigError(
        f"config key 'model.{field}' ({config.model.get(field)}) differs from "
        f"'data.{field}' ({config.data[field]}); set data.{field}"
      )
  resolved = config.copy_and_resolve_references()
  models.check_config(resolved.model, resolved.loss)


def to_dict(config: ConfigDict) -> dict[str, Any]:
  """JSON-able nested dict of the resolved config."""
  import json

  return json.loads(config.to_json_best_effort())


def from_dict(data: Mapping[str, Any]) -> ConfigDict:
  """Config rebuilt from :func:`to_dict` output (e.g. a run's ``config.json``): the base
  config, with the model and loss defaults of the saved ``model.name`` and ``loss.name``,
  updated with ``data``'s fields (unknown fields are added, tuples restored).
  ``model.image_size`` and ``model.num_classes`` follow ``data`` again where they agree."""
  config = base_config()
  model_name = data.get("model", {}).get("name", config.model.name)
  family = models.family_of({"name": model_name})
  config.model = family.default_model_config(model_name)
  config.loss = family.default_loss_config(data.get("loss", {}).get("name", config.loss.name))

  def update(node: ConfigDict, values: Mapping[str, Any]):
    for k, v in values.items():
      if isinstance(v, Mapping):
        if k not in node:
          node[k] = ConfigDict()
        update(node[k], v)
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
          # A field whose type changed, e.g. a None default: replace the field.
          del node[k]
          node[k] = v
      else:
        node[k] = v

  update(config, data)
  for field in ("image_size", "num_classes"):
    if field in config.model and config.model[field] == config.data.get(field):
      config.model[field] = config.data.get_ref(field)
  return config
