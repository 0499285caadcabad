"""Ranking-based object-detection losses in JAX (:mod:`jaxrank.losses`), detectors, training
and inference.

``load_detector``, ``export_detector`` and ``LoadedDetector`` (:mod:`jaxrank.inference`) are
imported on first use, so ``import jaxrank.losses`` needs only jax and numpy.
"""

import importlib

_LAZY = {
  "load_detector": "jaxrank.inference",
  "export_detector": "jaxrank.inference",
  "LoadedDetector": "jaxrank.inference",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'jaxrank' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
