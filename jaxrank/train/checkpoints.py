"""Orbax checkpoints with automatic resume, fallback and a SIGTERM handler.

A checkpoint ``<workdir>/checkpoints/<step>/`` holds two items:

* ``state``: the training state pytree (parameters, other model variables, optimiser
  state, loss state), restored with the shardings of an abstract target;
* ``meta``: JSON with the step, the data-iterator state (``data``: ``next_batch``, the
  training stream position of the next batch, and the layout it assumes), ``epoch``,
  ``batch_in_epoch``, ``steps_per_epoch`` and counters.

Orbax writes a step into a temporary directory and renames it when complete, so a run
killed mid-save leaves no partial step behind. A step that exists but cannot be read
(damaged files, or values that come back NaN/inf) is moved to
``<workdir>/checkpoints/corrupt/`` with a warning and the previous step is used instead. A
readable step whose arrays do not fit the abstract state (another model or optimiser)
raises :class:`IncompatibleCheckpointError` and is left where it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class NoUsableCheckpointError(RuntimeError):
  """No checkpoint step could be restored."""


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint whose arrays do not fit the requested state."""


class CheckpointWriteError(OSError):
  """The checkpoint folder cannot be written."""


def _leaf_signatures(tree: Any) -> list[tuple[tuple[int, ...], str]]:
  """Sorted ``(shape, dtype)`` of every array leaf: comparable between an abstract state and
  Orbax's metadata, whatever the container types became on disk."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  return sorted((tuple(int(d) for d in x.shape), str(np.dtype(x.dtype))) for x in leaves
                if hasattr(x, "shape"))


def all_finite(tree: Any) -> jax.Array:
  """True when every floating-point leaf of ``tree`` is finite (a scalar; jit-able)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.asarray(leaves)) if leaves else jnp.asarray(True)


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_savable(tree: Any) -> Any:
  """Typed PRNG key arrays replaced by their raw ``uint32`` data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def abstract_savable(tree: Any) -> Any:
  """The abstract (``ShapeDtypeStruct``) counterpart of :func:`to_savable` for an abstract
  or concrete tree."""

  def convert(x):
    sharding = getattr(x, "sharding", None)
    if _is_key(x):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(convert, tree)


def from_savable(tree: Any, like: Any) -> Any:
  """Inverse of :func:`to_savable`, using ``like`` (abstract or concrete) for key types."""

  def convert(x, ref):
    if _is_key(ref):
      return jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref) if not isinstance(
        ref, jax.ShapeDtypeStruct) else None)
    return x

  return jax.tree.map(convert, tree, like)


class Checkpointer:
  """Saves every ``save_every`` steps keeping the last ``keep``; restores the latest
  readable step.

  Args:
    directory: checkpoint folder (created).
    save_every: :meth:`due` is True when ``step % save_every == 0`` (0: never).
    keep: checkpoints kept (older ones are deleted).
    async_save: write in a background thread (the step returns once arrays are copied).
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = int(save_every)
    self._checked_writable = False
    options = ocp.CheckpointManagerOptions(
      max_to_keep=int(keep),
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save,
    )
    try:
      self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
      )
    except OSError as e:
      raise CheckpointWriteError(f"cannot use the checkpoint folder {self.directory}: "
                                 f"{e.strerror or e}") from None

  # -- queries -------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  # -- saving ---------------------------------------------------------------------------

  def check_writable(self) -> None:
    """Raises :class:`CheckpointWriteError` naming the folder if a file cannot be written
    in it."""
    probe = os.path.join(self.directory, f".write_probe_{os.getpid()}")
    try:
      os.makedirs(self.directory, exist_ok=True)
      with open(probe, "w", encoding="utf-8") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise CheckpointWriteError(
        f"cannot write checkpoints to {self.directory}: {e.strerror or e}") from None

  def due(self, step: int) -> bool:
    """``step`` is a multiple of ``save_every``."""
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
    """Saves ``state`` and ``meta`` at ``step`` (no-op if that step exists). The first save
    checks that the folder can be written and waits until it is on disk, so a failure is
    reported at once (:class:`CheckpointWriteError`)."""
    step = int(step)
    if step in self._manager.all_steps():
      return False
    first = not self._checked_writable
    if first and jax.process_index() == 0:
      self.check_writable()
    meta = {**meta, "step": step, "saved_at": time.time()}
    try:
      saved = self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(to_savable(state)), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
      )
      if first:
        self._manager.wait_until_finished()
    except OSError as e:
      raise CheckpointWriteError(f"saving checkpoint step {step} to {self.directory} failed: "
                                 f"{e}") from e
    self._checked_writable = True
    if saved:
      log.info("checkpoint step %d -> %s", step, self.directory)
    return bool(saved)

  def wait(self) -> None:
    """Blocks until background saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # -- restoring ------------------------------------------------------------------------

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """``(state, meta)`` of ``step``; ``abstract_state`` gives shapes, dtypes and
    shardings."""
    restored = self._manager.restore(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_savable(abstract_state)),
        meta=ocp.args.JsonRestore(),
      ),
    )
    state = from_savable(restored.state, abstract_state)
    return state, dict(restored.meta)

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises :class:`IncompatibleCheckpointError` when ``step``'s saved arrays (shapes,
    dtypes, count) differ from ``abstract_state``'s. Unreadable metadata passes (the restore
    then fails and the step counts as damaged)."""
    try:
      saved = self._manager.item_metadata(int(step))["state"]
      saved = getattr(saved, "tree", saved)
    except Exception:  # damaged metadata: left to restore()
      return
    if saved is None:
      return
    want = _leaf_signatures(abstract_savable(abstract_state))
    have = _leaf_signatures(saved)
    if want != have:
      missing = sorted(set(want) - set(have))[:3]
      extra = sorted(set(have) - set(want))[:3]
      raise IncompatibleCheckpointError(
        f"checkpoint step {step} in {self.directory} holds {len(have)} arrays that do not fit "
        f"the {len(want)} of this config's state (e.g. needed (shape, dtype) {missing}, saved "
        f"{extra})")

  def restore_meta(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(
      int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )
    return dict(restored.meta)

  def _quarantine(self, step: int) -> None:
    """Moves an unreadable step out of the way (so it is not reused or overwritten)."""
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst_dir = os.path.join(self.directory, "corrupt")
      os.makedirs(dst_dir, exist_ok=True)
      dst = os.path.join(dst_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
      if os.path.exists(src):
        shutil.move(src, dst)
        log.warning("moved unreadable checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"jaxrank_quarantine_{step}")
    self._manager.reload()

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """``(step, state, meta)`` of the latest readable checkpoint, or None if there is
    none. Unreadable steps are quarantined with a warning and older ones tried."""
    steps = self.all_steps()
    if not steps:
      return None
    failures = []
    for step in reversed(steps):
      self.check_compatible(step, abstract_state)
      try:
        state, meta = self.restore(step, abstract_state)
        if not bool(jax.jit(all_finite)(state)):
          raise ValueError("restored values are NaN or inf (damaged data files?)")
      except Exception as e:  # damaged files raise many exception types
        failures.append(step)
        older = [s for s in steps if s < step]
        log.warning(
          "checkpoint step %d in %s is unreadable (%s: %s); %s",
          step, self.directory, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "",
          f"falling back to step {older[-1]}" if older else "no older checkpoint",
        )
        self._quarantine(step)
        continue
      if failures:
        log.warning("resumed from step %d instead of the latest step %d", step, failures[0])
      return step, state, meta
    raise NoUsableCheckpointError(
      f"none of the checkpoints {steps} in {self.directory} could be restored; "
      "they were moved to the 'corrupt' folder. Start a new run or use another --workdir."
    )


class TerminationRequest:
  """Turns SIGTERM (and optionally SIGINT) into a flag checked between training steps,
  so the loop can save a checkpoint before exiting. Use as a context manager; the
  previous handlers are restored on exit. Only installs handlers in the main thread."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self._event = threading.Event()
    self.signum: int | None = None

  def _handler(self, signum, frame):
    if self._event.is_set():  # second signal: give up waiting
      previous = self._previous.get(signum)
      if callable(previous):
        previous(signum, frame)
      raise SystemExit(128 + signum)
    self.signum = signum
    self._event.set()
    log.warning("received %s: saving a checkpoint after the current step",
                signal.Signals(signum).name)

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def request(self) -> None:
    self._event.set()

  def __enter__(self) -> TerminationRequest:
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()


def any_process(flag: bool) -> bool:
  """True on every host if ``flag`` is True on any host."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
  return bool(np.any(flags))
