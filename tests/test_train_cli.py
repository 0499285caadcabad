"""``python -m jaxrank.train`` end to end in subprocesses: the work directory, SIGKILL and
resume, SIGTERM."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from test_train_helpers import (  # noqa: F401
  REPO,
  assert_states_equal,
  checkpoint_steps,
  env,
  jax_cache,
  load_meta,
  load_state,
  run,
  tiny_config,
  tiny_overrides,
  train_cmd,
)


def test_cli_smoke_writes_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  proc = run(train_cmd("--workdir", str(workdir), *tiny_overrides(
    train__num_steps=4, train__plots=True, train__progress_bar=True)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "finished tiny: step 4" in proc.stdout
  assert "train:" in proc.stderr  # tqdm progress bar
  config = json.load(open(workdir / "config.json"))
  assert config["train"]["num_steps"] == 4 and config["loss"]["name"] == "focal_smooth_l1"
  metrics = json.load(open(workdir / "metrics.json"))
  assert [e["step"] for e in metrics["train"]] == [1, 2, 3, 4]
  for key in ("loss", "cls_loss", "box_loss", "lr", "img_per_s", "grad_norm"):
    assert key in metrics["train"][-1]
  final = metrics["final"]
  for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_class_AP", "train_time_s"):
    assert key in final
  assert metrics["eval"][-1]["step"] == 4
  assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
  for png in ("loss_curves.png", "pr_curve.png", "val_detections.png"):
    assert (workdir / "plots" / png).stat().st_size > 1000, png
  assert checkpoint_steps(str(workdir)) == [2, 4]
  dets = json.load(open(workdir / "detections_val.json"))
  assert isinstance(dets, list) and all("bbox" in d for d in dets)
  assert (workdir / "train.log").exists()


def _wait_for(predicate, proc):
  """Waits until ``predicate()`` holds (True) or the process ends (False): on events, not on
  a time limit, so a loaded machine only makes the test slower."""
  while not predicate():
    if proc.poll() is not None:
      return predicate()
    time.sleep(0.05)
  return True


# Constant learning rate after a 2-step warmup, so the number of steps of a run does not
# change the updates: a long run killed at step k resumed to step N equals a run of N steps.
_LONG = dict(train__checkpoint_every=3, optimizer__decay_steps=(), train__log_every=1,
             train__keep_checkpoints=20)


def _children(pid: int) -> list[int]:
  """Processes whose parent is ``pid`` (Linux /proc)."""
  out = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/status") as f:
        if f"PPid:\t{pid}\n" in f.read():
          out.append(int(entry))
    except (OSError, ValueError):
      pass
  return out


def _running(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/status") as f:
      return "State:\tZ" not in f.read()
  except OSError:
    return False


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, jax_cache):
  """Killed with 2 loader processes, resumed with 1, equal to an uninterrupted in-process run;
  the killed run's loader processes exit."""
  from jaxrank.train import trainer

  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  proc = subprocess.Popen(
    train_cmd("--workdir", killed, *tiny_overrides(train__num_steps=100000,
                                                   data__num_workers=2, **_LONG)),
    cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  loaders = []
  try:
    started = _wait_for(lambda: 3 in checkpoint_steps(killed), proc)
    assert started, proc.stderr.read()[-3000:] if proc.poll() is not None else "timeout"
    loaders = [pid for pid in _children(proc.pid)
               if "spawn_main" in open(f"/proc/{pid}/cmdline").read()]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert len(loaders) >= 2
  deadline = time.time() + 30
  while any(_running(pid) for pid in loaders) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(_running(pid) for pid in loaders), "loader processes outlived the killed run"
  steps = checkpoint_steps(killed)
  assert steps and max(steps) < 30
  # Resume to step 30, and compare with a run of 30 uninterrupted steps.
  resumed = run(train_cmd("--workdir", killed, *tiny_overrides(train__num_steps=30,
                                                                data__num_workers=1, **_LONG)))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint step" in resumed.stderr
  trainer.train(tiny_config(train__num_steps=30, **_LONG), ref)  # uninterrupted, in-process
  a, b = load_state(ref, 30), load_state(killed, 30)
  assert_states_equal(a, b, rtol=0, atol=0, prefix="[")
  assert load_meta(killed, 30)["epoch"] == load_meta(ref, 30)["epoch"] == 7


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(
    train_cmd("--workdir", workdir, *tiny_overrides(
      train__num_steps=100000, train__checkpoint_every=0, train__log_every=1)),
    cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def training():
    try:
      return len(json.load(open(os.path.join(workdir, "metrics.json")))["train"]) >= 2
    except (OSError, ValueError, KeyError):
      return False

  try:
    assert _wait_for(training, proc), "training did not start"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 143, err[-3000:]
  assert "terminated by signal" in err and "to resume" in err
  steps = checkpoint_steps(workdir)
  assert len(steps) == 1 and steps[0] >= 2
  meta = load_meta(workdir, steps[0])
  assert meta["step"] == steps[0]
  state = load_state(workdir, steps[0])
  assert all(np.all(np.isfinite(v)) for v in state.values() if v.dtype.kind == "f")


@pytest.mark.parametrize("args,code,message", [
  (["--config.train.nope=1"], 2, "unknown config key 'train.nope'"),
])
def test_cli_config_errors_exit_with_a_message(args, code, message):
  proc = run(train_cmd(*args))
  assert proc.returncode == code
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
