"""Trained detectors for inference: load a run or an export, predict on images of any size.

>>> from jaxrank import load_detector                       # doctest: +SKIP
>>> from jaxrank.data import read_image                     # doctest: +SKIP
>>> detector = load_detector("runs/my-run")                 # doctest: +SKIP
>>> detector.predict(read_image("photo.jpg"))["boxes"]      # doctest: +SKIP

``load_detector(path)`` takes a training run folder (``config.json``, ``class_names.json``,
``checkpoints/<step>/``) or an export folder written by :func:`export_detector`
(``config.json``, ``class_names.json``, ``export.json``, ``weights.npz``). Only the model
variables (``params`` and ``rest``) are read, never the optimiser state.

An export's ``weights.npz`` is a plain NumPy archive: one array per model variable, named by
its path in ``{'params': ..., 'rest': ...}`` (``jax.tree_util.keystr``); PRNG keys are stored
as their ``uint32`` key data and non-NumPy dtypes (e.g. bfloat16) as raw bytes of the same
width, restored from the model's own dtypes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrank.data.transforms import prepare_image_for_inference
from jaxrank.train import config as config_lib
from jaxrank.train import steps as steps_lib
from jaxrank.train.checkpoints import abstract_savable, all_finite, from_savable, to_savable
from jaxrank.validation import Section

log = logging.getLogger(__name__)

EXPORT_FORMAT = "jaxrank-detector"
EXPORT_VERSION = 1
WEIGHTS_FILE = "weights.npz"
EXPORT_FILE = "export.json"
POST_OPTIONS = ("score_threshold", "max_detections", "iou_threshold", "pre_nms_top_k")

__all__ = ["EXPORT_FORMAT", "LoadedDetector", "export_detector", "is_export_folder",
           "is_run_folder", "load_detector"]


# ----------------------------------------------------------------------------------------
# Folders.


def is_export_folder(path: str | os.PathLike) -> bool:
  """``path`` holds an export (``export.json`` and ``weights.npz``)."""
  path = os.fspath(path)
  return (os.path.isfile(os.path.join(path, EXPORT_FILE))
          and os.path.isfile(os.path.join(path, WEIGHTS_FILE)))


def is_run_folder(path: str | os.PathLike) -> bool:
  """``path`` holds a training run (``config.json`` and a ``checkpoints`` folder)."""
  path = os.fspath(path)
  return (os.path.isfile(os.path.join(path, "config.json"))
          and os.path.isdir(os.path.join(path, "checkpoints")))


def _read_json(path: str, what: str) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found: {path}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {what} {path}: {e}") from None


def _read_config(folder: str):
  data = _read_json(os.path.join(folder, "config.json"), "run config")
  if not isinstance(data, dict) or "model" not in data:
    raise ValueError(f"{os.path.join(folder, 'config.json')} is not a jaxrank run config "
                     "(no 'model' section)")
  config = config_lib.from_dict(data)
  with config.unlocked():
    # The weights come from the checkpoint: never read the backbone's pretrained file again.
    if "pretrained" in config.model:
      config.model.pretrained = ""
  return data, config.copy_and_resolve_references()


def _read_class_names(folder: str, num_classes: int) -> tuple[str, ...]:
  path = os.path.join(folder, "class_names.json")
  if not os.path.isfile(path):
    log.warning("%s not found; classes are named by their 0-based labels", path)
    return tuple(str(i) for i in range(num_classes))
  names = _read_json(path, "class names")
  if not isinstance(names, list) or len(names) != num_classes:
    raise ValueError(f"{path} must be a list of {num_classes} class names (model.num_classes), "
                     f"got {names!r:.200}")
  return tuple(str(n) for n in names)


def _checkpoint_steps(checkpoint_dir: str) -> list[int]:
  """Finished checkpoint steps (Orbax writes unfinished ones under temporary names)."""
  return sorted(int(n) for n in os.listdir(checkpoint_dir)
                if n.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, n, "state")))


# ----------------------------------------------------------------------------------------
# Model variables.


def _abstract_model(config):
  """``graphdef`` and the abstract ``{'params', 'rest'}`` (savable) on one device."""
  graphdef, params, rest = steps_lib.split_model(
    nnx.eval_shape(lambda: steps_lib.build_model(config)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          {"params": params, "rest": rest})
  return graphdef, abstract


def _restore_checkpoint_step(state_dir: str, abstract) -> dict[str, Any]:
  """``params`` and ``rest`` of a checkpoint's ``state`` item (the optimiser state and the
  loss state are not read)."""
  import orbax.checkpoint as ocp

  target = abstract_savable(abstract)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
      state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                             partial_restore=True))
  restored = {"params": restored["params"], "rest": restored["rest"]}
  for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(target)[0],
                                jax.tree.leaves(restored)):
    if tuple(have.shape) != tuple(want.shape) or have.dtype != want.dtype:
      raise ValueError(f"{jax.tree_util.keystr(path)} is {have.dtype}{list(have.shape)}, the "
                       f"config's model needs {want.dtype}{list(want.shape)}")
  if not bool(jax.jit(all_finite)(restored)):
    raise ValueError("restored values are NaN or inf (damaged data files?)")
  return from_savable(restored, abstract)


def _restore_run(folder: str, abstract, step: int | None) -> tuple[dict[str, Any], int]:
  checkpoint_dir = os.path.join(folder, "checkpoints")
  steps = _checkpoint_steps(checkpoint_dir)
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {checkpoint_dir}")
  if step is not None:
    if int(step) not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir} "
                              f"(have {steps})")
    state_dir = os.path.join(checkpoint_dir, str(int(step)), "state")
    try:
      return _restore_checkpoint_step(state_dir, abstract), int(step)
    except Exception as e:  # damaged files raise many exception types
      raise ValueError(f"cannot restore checkpoint step {step} from {state_dir}: "
                       f"{type(e).__name__}: {str(e)[:500]}") from e
  failures = []
  for candidate in reversed(steps):
    state_dir = os.path.join(checkpoint_dir, str(candidate), "state")
    try:
      return _restore_checkpoint_step(state_dir, abstract), candidate
    except Exception as e:  # damaged files raise many exception types
      message = str(e).splitlines()[0][:300] if str(e) else ""
      failures.append(f"step {candidate}: {type(e).__name__}: {message}")
      log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one",
                  candidate, checkpoint_dir, failures[-1])
  raise ValueError(f"none of the checkpoints in {checkpoint_dir} could be restored: "
                   + "; ".join(failures))


def _weight_key(path) -> str:
  return jax.tree_util.keystr(path)


def _restore_export(folder: str, abstract) -> dict[str, Any]:
  weights_path = os.path.join(folder, WEIGHTS_FILE)
  target = abstract_savable(abstract)
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  try:
    with np.load(weights_path, allow_pickle=False) as archive:
      stored = {k: archive[k] for k in archive.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read the weights file {weights_path}: {e}") from None
  wanted = {_weight_key(p) for p, _ in leaves_with_paths}
  missing, extra = sorted(wanted - set(stored)), sorted(set(stored) - wanted)
  if missing or extra:
    raise ValueError(f"{weights_path} does not fit the model of its config.json: missing "
                     f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
                     f"{extra[:3]}{' ...' if len(extra) > 3 else ''}")
  leaves = []
  for path, want in leaves_with_paths:
    key = _weight_key(path)
    value = stored[key]
    dtype = np.dtype(want.dtype)
    if value.dtype != dtype and value.dtype.kind == "V" and value.dtype.itemsize == dtype.itemsize:
      value = value.view(dtype)  # bfloat16 and other ml_dtypes are stored as raw bytes
    if value.shape != tuple(want.shape) or value.dtype != dtype:
      raise ValueError(f"{weights_path}: {key} is {value.dtype}{list(value.shape)}, the model "
                       f"needs {dtype}{list(want.shape)}")
    leaves.append(jax.device_put(value, want.sharding))
  return from_savable(jax.tree_util.tree_unflatten(treedef, leaves), abstract)


# ----------------------------------------------------------------------------------------
# The loaded detector.


def _as_rgb(image) -> np.ndarray:
  """``uint8 [H, W, 3]``; grayscale ``[H, W]`` and RGBA ``[H, W, 4]`` are converted."""
  image = np.asarray(image)
  if image.dtype == np.uint8 and image.ndim == 2:
    return np.repeat(image[:, :, None], 3, axis=2)
  if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 4:
    return image[:, :, :3]
  return image  # anything else is checked by prepare_image_for_inference


class LoadedDetector:
  """A trained detector ready for inference (made by :func:`load_detector`).

  Attributes:
    detector: the Flax NNX detector module, with the restored variables.
    class_names: tuple of class names; a detection's ``classes`` value indexes it.
    image_size: ``S``, the side of the square frame the detector sees.
    config: the run's config (``ml_collections.ConfigDict``, references resolved).
    step: the training step of the weights (None if unknown).
    path: the folder it was loaded from.
  """

  def __init__(self, *, graphdef, variables: dict[str, Any], config, class_names: Sequence[str],
               step: int | None, path: str, config_dict: dict[str, Any]):
    self.config = config
    self.class_names = tuple(class_names)
    self.image_size = int(config.model.image_size)
    self.step = step
    self.path = path
    self._config_dict = config_dict
    self._graphdef = graphdef
    self._variables = variables
    self.detector = nnx.merge(graphdef, variables["params"], variables["rest"])
    self._detect = jax.jit(self._detect_fn, static_argnames=POST_OPTIONS)

  def __repr__(self) -> str:
    return (f"LoadedDetector(path={self.path!r}, step={self.step}, model="
            f"{self.config.model.name!r}, image_size={self.image_size}, "
            f"classes={len(self.class_names)})")

  def _detect_fn(self, params, rest, images, **post):
    det = nnx.merge(self._graphdef, params, rest).detect(images, **post)
    return det.boxes, det.scores, det.classes, det.valid

  def post_options(self, **overrides) -> dict[str, Any]:
    """The post-processing options: the run's ``eval`` section with ``overrides`` (None:
    the run's value); bad values raise :class:`ValueError` naming the option."""
    options = Section({name: self.config.eval[name] if overrides.get(name) is None
                       else overrides[name] for name in POST_OPTIONS}, "eval")
    return {"score_threshold": options.number("score_threshold"),
            "iou_threshold": options.number("iou_threshold", min=0.0, max=1.0),
            "max_detections": options.integer("max_detections", min=1),
            "pre_nms_top_k": options.integer("pre_nms_top_k", min=1)}

  def predict(self, image, *, score_threshold: float | None = None,
              max_detections: int | None = None, iou_threshold: float | None = None,
              pre_nms_top_k: int | None = None) -> dict[str, Any]:
    """Detections of one image of any size, in its own pixels.

    Args:
      image: ``uint8 [H, W, 3]`` RGB (``[H, W]`` grayscale and ``[H, W, 4]`` RGBA are
        converted), e.g. from :func:`jaxrank.data.read_image`.
      score_threshold, max_detections, iou_threshold, pre_nms_top_k: post-processing
        options; None takes the run config's ``eval`` value.

    Returns:
      ``{'boxes': float32 [N, 4] xyxy pixels of the image (clipped to it), 'scores':
      float32 [N], 'classes': int32 [N] (0-based labels), 'class_names': list of N str}``,
      by descending score. Detections that lie wholly in the padding (empty once clipped
      to the image) are dropped.
    """
    post = self.post_options(score_threshold=score_threshold, max_detections=max_detections,
                             iou_threshold=iou_threshold, pre_nms_top_k=pre_nms_top_k)
    image = _as_rgb(image)
    prepared, scale = prepare_image_for_inference(image, self.image_size)
    height, width = image.shape[:2]
    boxes, scores, classes, valid = jax.device_get(self._detect(
      self._variables["params"], self._variables["rest"], jnp.asarray(prepared)[None], **post))
    keep = np.asarray(valid[0], bool)
    boxes = np.asarray(boxes[0], np.float32)[keep] / np.float32(scale)
    boxes = np.clip(boxes, 0.0, np.array([width, height, width, height], np.float32))
    scores = np.asarray(scores[0], np.float32)[keep]
    classes = np.asarray(classes[0], np.int32)[keep]
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    order = np.argsort(-scores[nonempty], kind="stable")
    boxes, scores, classes = (x[nonempty][order] for x in (boxes, scores, classes))
    names = [self.class_names[c] if 0 <= c < len(self.class_names) else str(c)
             for c in classes.tolist()]
    return {"boxes": boxes, "scores": scores, "classes": classes, "class_names": names}

  def export(self, out_dir: str | os.PathLike) -> str:
    """Writes the params-only export (see the module docstring) to ``out_dir``; returns it."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.isdir(os.path.join(out_dir, "checkpoints")):
      raise ValueError(f"{out_dir} holds a training run (checkpoints/); export to another "
                       "folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
      raise ValueError(f"export folder {out_dir} is a file")
    os.makedirs(out_dir, exist_ok=True)
    savable = jax.device_get(to_savable(self._variables))
    arrays = {_weight_key(p): np.asarray(v)
              for p, v in jax.tree_util.tree_flatten_with_path(savable)[0]}
    tmp = os.path.join(out_dir, f".{WEIGHTS_FILE}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))
    meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "step": self.step,
            "source": self.path, "num_arrays": len(arrays),
            "num_parameters": int(sum(a.size for k, a in arrays.items()
                                      if k.startswith("['params']")))}
    for name, data in (("config.json", self._config_dict),
                       ("class_names.json", list(self.class_names)), (EXPORT_FILE, meta)):
      with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return out_dir


# ----------------------------------------------------------------------------------------
# Entry points.


def load_detector(path: str | os.PathLike, step: int | None = None) -> LoadedDetector:
  """The detector of a training run folder or an export folder.

  Args:
    path: a run folder (``config.json``, ``class_names.json``, ``checkpoints/``) or an
      export folder from :func:`export_detector`.
    step: the checkpoint step of a run (None: the latest readable one, falling back to
      older steps with a warning; the run folder is never changed). With an export it must
      be None or the exported step.

  Raises:
    FileNotFoundError: ``path``, its ``config.json``, or any (or the ``step``) checkpoint
      is missing.
    ValueError: ``path`` is neither kind of folder, or its files cannot be read or do not fit
      its config's model.
  """
  folder = os.path.abspath(os.fspath(path))
  if not os.path.exists(folder):
    raise FileNotFoundError(f"detector folder not found: {folder}")
  if not os.path.isdir(folder):
    raise ValueError(f"{folder} is not a folder (expected a training run or an export folder)")
  export = is_export_folder(folder)
  if not export and not is_run_folder(folder):
    raise ValueError(f"{folder} is neither a training run folder (config.json and "
                     f"checkpoints/) nor an export folder ({EXPORT_FILE} and {WEIGHTS_FILE})")
  config_dict, config = _read_config(folder)
  class_names = _read_class_names(folder, int(config.model.num_classes))
  graphdef, abstract = _abstract_model(config)
  if export:
    meta = _read_json(os.path.join(folder, EXPORT_FILE), "export metadata")
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
      raise ValueError(f"{os.path.join(folder, EXPORT_FILE)} is not a {EXPORT_FORMAT} export")
    if int(meta.get("version", 0)) > EXPORT_VERSION:
      raise ValueError(f"{folder} is export version {meta.get('version')}; this jaxrank reads "
                       f"up to version {EXPORT_VERSION}")
    if step is not None and meta.get("step") is not None and int(step) != int(meta["step"]):
      raise ValueError(f"{folder} is an export of step {meta['step']}, not step {step}")
    variables, loaded_step = _restore_export(folder, abstract), meta.get("step")
  else:
    variables, loaded_step = _restore_run(folder, abstract, step)
  return LoadedDetector(graphdef=graphdef, variables=variables, config=config,
                        class_names=class_names, step=loaded_step, path=folder,
                        config_dict=config_dict)


def export_detector(run_folder: str | os.PathLike, out_dir: str | os.PathLike,
                    step: int | None = None) -> str:
  """Writes a params-only export of ``run_folder`` (latest readable checkpoint, or
  ``step``) to ``out_dir`` and returns its absolute path: ``config.json``,
  ``class_names.json``, ``export.json`` and ``weights.npz`` (no optimiser state);
  :func:`load_detector` reads it and gives the same detections as the run."""
  return load_detector(run_folder, step=step).export(out_dir)
