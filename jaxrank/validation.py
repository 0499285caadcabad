"""Checks of config fields: one style for every section of every config.

>>> import ml_collections
>>> section = Section(ml_collections.ConfigDict({"lr": 0.1, "name": "sgd"}), "optimizer")
>>> section.number("lr", above=0.0)
0.1
>>> section.choice("name", ("sgd", "adamw"))
'sgd'
>>> section.integer("lr", min=1)
Traceback (most recent call last):
...
jaxrank.validation.ConfigError: config key 'optimizer.lr' must be an int, got 0.1

Imports only the standard library and NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


class ConfigError(ValueError):
  """An invalid config file, section, key or value."""


def _bounds_text(min, max, above, below) -> str:
  parts = []
  if min is not None:
    parts.append(f">= {min}")
  if above is not None:
    parts.append(f"> {above}")
  if max is not None:
    parts.append(f"<= {max}")
  if below is not None:
    parts.append(f"< {below}")
  return " and ".join(parts)


def _in_bounds(value, min, max, above, below) -> bool:
  return ((min is None or value >= min) and (max is None or value <= max)
          and (above is None or value > above) and (below is None or value < below))


class Section:
  """The fields of one config section; every error names ``'<section>.<field>'``.

  Args:
    config: the section (a ConfigDict or any mapping).
    name: its dotted name in the whole config, e.g. ``'model'`` or ``'search'``.
  """

  def __init__(self, config: Mapping[str, Any], name: str):
    self.config = config
    self.name = name

  def key(self, field: str) -> str:
    return f"{self.name}.{field}" if self.name else field

  def error(self, field: str, message: str) -> ConfigError:
    return ConfigError(f"config key {self.key(field)!r} {message}")

  def fields(self, expected: Iterable[str]) -> None:
    """Unknown or missing fields are errors."""
    expected = tuple(expected)
    keys = set(self.config.keys())
    unknown = sorted(keys - set(expected))
    if unknown:
      raise ConfigError(f"unknown config key(s) {[self.key(k) for k in unknown]} (known in "
                        f"{self.name or 'the top level'}: {', '.join(sorted(expected))})")
    missing = [f for f in expected if f not in keys]
    if missing:
      raise ConfigError(f"config lacks the key(s) {[self.key(k) for k in missing]}")

  def integer(self, field: str, *, min: int | None = None, max: int | None = None) -> int:
    value = self.config[field]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise self.error(field, f"must be an int, got {value!r}")
    if not _in_bounds(value, min, max, None, None):
      raise self.error(field, f"must be {_bounds_text(min, max, None, None)}, got {value!r}")
    return int(value)

  def number(self, field: str, *, min: float | None = None, max: float | None = None,
             above: float | None = None, below: float | None = None) -> float:
    """A finite real number within the bounds (``min``/``max`` inclusive, ``above``/``below``
    exclusive)."""
    value = self.config[field]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
      raise self.error(field, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
      raise self.error(field, f"must be a finite number, got {value!r}")
    if not _in_bounds(value, min, max, above, below):
      raise self.error(field, f"must be {_bounds_text(min, max, above, below)}, got {value!r}")
    return value

  def optional_number(self, field: str, **bounds) -> float | None:
    return None if self.config[field] is None else self.number(field, **bounds)

  def numbers(self, field: str, *, length: int | None = None, min: float | None = None,
              max: float | None = None, above: float | None = None,
              below: float | None = None,
              increasing: bool = False, allow_empty: bool = False) -> tuple[float, ...]:
    """A sequence of finite numbers (each within the bounds)."""
    value = self.config[field]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
      raise self.error(field, f"must be a sequence of numbers, got {value!r}")
    items = list(value)
    if any(isinstance(v, bool) or not isinstance(v, (int, float, np.number)) for v in items):
      raise self.error(field, f"must be a sequence of numbers, got {value!r}")
    values = tuple(float(v) for v in items)
    if not values and not allow_empty:
      raise self.error(field, "must not be empty")
    if length is not None and len(values) != length:
      raise self.error(field, f"must have {length} numbers, got {len(values)}: {value!r}")
    bad = [v for v in values if not math.isfinite(v) or not _in_bounds(v, min, max, above, below)]
    if bad:
      bounds = _bounds_text(min, max, above, below)
      raise self.error(field, f"must hold finite numbers{' ' + bounds if bounds else ''}, "
                              f"got {value!r}")
    if increasing and list(values) != sorted(values):
      raise self.error(field, f"must increase, got {value!r}")
    return values

  def choice(self, field: str, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    value = self.config[field]
    if value not in choices:
      raise self.error(field, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value

  def boolean(self, field: str) -> bool:
    value = self.config[field]
    if not isinstance(value, (bool, np.bool_)):
      raise self.error(field, f"must be true or false, got {value!r}")
    return bool(value)

  def string(self, field: str) -> str:
    value = self.config[field]
    if not isinstance(value, str):
      raise self.error(field, f"must be a string, got {value!r}")
    return value
