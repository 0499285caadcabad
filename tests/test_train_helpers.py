"""Shared helpers of the trainer tests (no tests here)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small and fast: 64 px images, a tiny detector, 4 steps of 8 images.
TINY = {
  "name": "tiny",
  "data.image_size": 64,
  "data.num_train": 32,
  "data.num_val": 8,
  "data.max_objects": 3,
  "data.min_object_size": 10,
  "data.max_boxes": 8,
  "data.num_workers": 0,
  "model.fpn_channels": 16,
  "model.head_channels": 16,
  "model.head_convs": 1,
  "train.batch_size": 8,
  "train.num_steps": 4,
  "train.log_every": 1,
  "train.checkpoint_every": 2,
  "train.keep_checkpoints": 10,
  "train.progress_bar": False,
  "train.plots": False,
  "eval.batch_size": 8,
  "eval.num_plot_images": 4,
  "optimizer.warmup_steps": 2,
  "optimizer.schedule": "step",
  "optimizer.decay_steps": (6,),
  "optimizer.lr": 1e-3,
}


# Persistent XLA compilation cache shared by the trainer tests (and their subprocesses):
# the tiny runs compile the same programs, so all but the first load them from disk.
JAX_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxrank-test-jax-cache")
_CACHE_ENV = {
  "JAX_COMPILATION_CACHE_DIR": JAX_CACHE,
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


@contextlib.contextmanager
def compilation_cache():
  """The shared persistent compilation cache, enabled inside the ``with`` block."""
  import jax

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  try:
    yield JAX_CACHE
  finally:
    for n, v in old.items():
      jax.config.update(n, v)


@pytest.fixture
def jax_cache():
  """Enables the shared persistent compilation cache for one test."""
  with compilation_cache() as path:
    yield path


def tiny_config(loss: str = "focal_smooth_l1", **updates):
  """A config that trains in seconds; ``updates`` use ``__`` for ``.``
  (``train__num_steps=2``)."""
  from jaxrank.train import config as config_lib
  from jaxrank.train import presets

  config = presets.synthetic_config(loss, name="tiny")
  tiny = {k: v for k, v in TINY.items()
          if not k.startswith("model.") or k.split(".", 1)[1] in config.model}
  if "num_queries" in config.model:  # a query-based detector
    tiny.update({"model.hidden_dim": 16, "model.num_heads": 2, "model.num_points": 2,
                 "model.encoder_layers": 1, "model.decoder_layers": 2, "model.ffn_dim": 32,
                 "model.num_queries": 10})
  if "aux_queries" in config.model:  # Co-DETR
    tiny.update({"model.aux_queries": 12, "model.fc_channels": 32,
                 "model.rpn_train_post_nms": 40})
  if "rpn_channels" in config.model:  # a two-stage detector
    tiny.update({"model.rpn_channels": 16, "model.fc_channels": 32,
                 "model.rpn_train_post_nms": 32, "model.rpn_test_post_nms": 32})
  config_lib.set_fields(config, tiny)
  config_lib.set_fields(config, {k.replace("__", "."): v for k, v in updates.items()})
  return config


def tiny_overrides(**updates) -> list[str]:
  """``--config`` (focal loss: fast to compile) and ``--config.KEY=VALUE`` arguments for
  :data:`TINY` plus ``updates``."""
  values = {**TINY, **{k.replace("__", "."): v for k, v in updates.items()}}
  args = ["--config", os.path.join(REPO, "configs", "synthetic_focal_smooth_l1.py")]
  for k, v in values.items():
    if isinstance(v, tuple):
      v = ",".join(str(x) for x in v) if v else "()"
    args.append(f"--config.{k}={v}")
  return args


def env(devices: int | None = None, **extra) -> dict[str, str]:
  e = dict(os.environ)
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  e.setdefault("JAX_PLATFORMS", "cpu")
  e.pop("XLA_FLAGS", None)
  e.update(_CACHE_ENV)
  if devices:
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e.update(extra)
  return e


def train_cmd(*args: str) -> list[str]:
  return [sys.executable, "-m", "jaxrank.train", *args]


def run(cmd, *, timeout=None, devices=None, env_extra=None, **kwargs):
  e = env(devices)
  for k, v in (env_extra or {}).items():
    if v:
      e[k] = v
    else:
      e.pop(k, None)
  return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True,
                        timeout=timeout, **kwargs)


def checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def load_state(workdir: str, step: int) -> dict[str, np.ndarray]:
  """Flat ``{path: array}`` of the saved training state at ``step``."""
  import jax
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
  checkpointer = ocp.StandardCheckpointer()
  # A target on this process's first device (the checkpoint may come from other
  # devices or processes).
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata)
  tree = checkpointer.restore(path, target)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def load_meta(workdir: str, step: int) -> dict:
  with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
    return json.load(f)


def assert_states_equal(a: dict, b: dict, *, rtol=1e-6, atol=1e-7, prefix="['params']"):
  keys = sorted(k for k in a if k.startswith(prefix))
  assert keys and keys == sorted(k for k in b if k.startswith(prefix))
  for k in keys:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def make_coco_folder(root: str, *, num_images: int = 12, size: int = 64, bad_boxes=True,
                     empty_images: int = 2, corrupt: int = 0, seed: int = 0):
  """A COCO-style folder from synthetic shapes: ``images/`` PNGs and ``ann.json``.

  Adds zero-area, negative-size and out-of-image boxes (``bad_boxes``), images without
  annotations (``empty_images``) and undecodable image files (``corrupt``).
  """
  from PIL import Image

  from jaxrank.data import make_synthetic_dataset

  ds = make_synthetic_dataset(num_images, image_size=size, num_classes=3, max_objects=3,
                              min_size=10, seed=seed)
  img_dir = os.path.join(root, "images")
  os.makedirs(img_dir, exist_ok=True)
  images, anns = [], []
  for i, rec in enumerate(ds.records):
    name = f"img_{i:03d}.png"
    Image.fromarray(rec.source).save(os.path.join(img_dir, name))
    images.append({"id": rec.image_id, "file_name": name, "width": size, "height": size})
    if i < empty_images:
      continue  # an image without annotations
    for box, label in zip(rec.boxes.tolist(), rec.labels.tolist()):
      x1, y1, x2, y2 = box
      anns.append({"id": len(anns) + 1, "image_id": rec.image_id, "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0})
    if bad_boxes:
      for bbox in ([5, 5, 0, 10], [5, 5, -4, 6], [size + 10, size + 10, 5, 5],
                   [-20, -20, 10, 10], [size - 4, 2, 30, 10]):  # last: clipped, kept
        anns.append({"id": len(anns) + 1, "image_id": rec.image_id, "category_id": 1,
                     "bbox": bbox, "iscrowd": 0})
  for j in range(corrupt):
    name = f"corrupt_{j}.jpg"
    with open(os.path.join(img_dir, name), "wb") as f:
      f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    image_id = 1000 + j
    images.append({"id": image_id, "file_name": name, "width": size, "height": size})
    anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1,
                 "bbox": [4, 4, 20, 20], "iscrowd": 0})
  data = {"images": images, "annotations": anns,
          "categories": [{"id": k + 1, "name": n} for k, n in enumerate(ds.class_names)]}
  path = os.path.join(root, "ann.json")
  with open(path, "w") as f:
    json.dump(data, f)
  return img_dir, path
