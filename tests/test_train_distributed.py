"""Data parallelism: 8 fake CPU devices give the 1-device step; 2 processes give the
1-process run. Each runs in a subprocess so that XLA_FLAGS and jax.distributed never touch
the test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from test_train_helpers import (  # noqa: F401
  REPO,
  assert_states_equal,
  checkpoint_steps,
  env,
  jax_cache,
  load_state,
  tiny_config,
  tiny_overrides,
  train_cmd,
)

_STEP_SCRIPT = textwrap.dedent("""
  import sys
  sys.path.insert(0, {tests!r})
  import jax, numpy as np
  from test_train_helpers import tiny_config
  from jaxrank.train import input_pipeline, optim, steps, trainer
  from jaxrank.train import sharding as sh

  loss, ranking = sys.argv[1], sys.argv[2]
  atol = float(sys.argv[3]) if len(sys.argv) > 3 else 2e-6
  assert jax.device_count() == 8, jax.devices()
  base = tiny_config(loss, train__ranking="per_device" if ranking != "global" else "global")
  train_ds, _ = input_pipeline.build_datasets(base.data)
  with input_pipeline.train_batches(train_ds, base.data, per_host_batch=8, start_step=0,
                                    num_steps=2) as it:
    batches = [next(it), next(it)]
  out = {{}}
  for n in (1, 8):
    mesh = sh.make_mesh(jax.devices()[:n])
    config = trainer.resolve_config(base, num_devices=n, steps_per_epoch=4)
    if ranking == "per_device_as_8":  # 1 device ranking 8 groups, like 8 devices
      config.loss.ranking_groups = 8
    tx, _ = optim.build_optimizer(config.optimizer, global_batch_size=8, total_steps=4,
                                  steps_per_epoch=4)
    graphdef, init = steps.init_state(config, mesh)
    opt = jax.jit(tx.init, out_shardings=sh.replicated(mesh))(init["params"])
    state = dict(init, opt_state=opt)
    step = steps.make_train_step(graphdef, tx, mesh)
    losses = []
    for b in batches:
      gb = sh.global_batch(b, mesh)
      assert len(gb["image"].sharding.device_set) == n
      state, m = step(state, gb)
      losses.append(float(m["loss"]))
    assert len(jax.tree.leaves(state["params"])[0].sharding.device_set) == n
    out[n] = (jax.tree.leaves(jax.device_get(state["params"])), losses, config.loss.ranking_groups)
  (p1, l1, g1), (p8, l8, g8) = out[1], out[8]
  print("losses", l1, l8, "groups", g1, g8)
  np.testing.assert_allclose(l1, l8, rtol=2e-5, atol=1e-6)
  for a, b in zip(p1, p8):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=atol)
  print("OK")
""").format(tests=os.path.dirname(os.path.abspath(__file__)))


def _run_step_script(loss, ranking, atol=2e-6):
  proc = subprocess.run([sys.executable, "-c", _STEP_SCRIPT, loss, ranking, str(atol)], cwd=REPO,
                        env=env(devices=8), capture_output=True, text=True)
  assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
  return proc.stdout


def test_8_devices_step_equals_1_device_step():
  out = _run_step_script("focal_smooth_l1", "global")
  assert "groups 1 1" in out


@pytest.mark.parametrize("recipe", [
    "faster_rcnn_rank_sort",
    pytest.param("faster_rcnn_ce_giou", marks=pytest.mark.slow),  # the random samplers
])
def test_8_devices_two_stage_step_equals_1_device_step(recipe):
  out = _run_step_script(recipe, "global")
  assert "groups 1 1" in out


@pytest.mark.slow  # ~2 min: the sharding machinery is the one tested above
@pytest.mark.parametrize("recipe", ["detr_bucketed_rank_sort", "detr_focal", "brs_detr",
                                    "co_detr_focal"])
def test_8_devices_query_based_step_equals_1_device_step(recipe):
  # Losses agree to every digit; clipping to 0.1 leaves some gradients near AdamW's eps, where
  # float reassociation moves single updates by ~2e-6 (parameters of ~1e-6 after two steps).
  out = _run_step_script(recipe, "global", atol=1e-5)
  assert "groups 1 1" in out


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["rank_sort", "alrp"])
def test_8_devices_global_ranking_equals_1_device(loss):
  _run_step_script(loss, "global")


@pytest.mark.slow
def test_per_device_ranking_uses_one_group_per_device():
  # 8 devices with 'per_device' ranking (8 groups) == 1 device with 8 ranking groups.
  out = _run_step_script("rank_sort", "per_device_as_8")
  assert "groups 8 8" in out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_give_the_one_process_result(tmp_path, jax_cache):
  """2 processes x 1 CPU device, each reading half of every batch == 1 process."""
  from jaxrank.train import trainer

  args = tiny_overrides(train__num_steps=4, train__checkpoint_every=2, data__num_workers=1)
  single = str(tmp_path / "single")
  trainer.train(tiny_config(train__num_steps=4, train__checkpoint_every=2), single)

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [
    subprocess.Popen(
      train_cmd("--workdir", multi, "--no_progress", *args,
                f"--coordinator_address=localhost:{port}", "--num_processes=2",
                f"--process_id={i}"),
      cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate())
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  assert "2 processes" in outputs[0][1] or "on 2 processes" in outputs[0][1]
  assert checkpoint_steps(multi) == [2, 4]
  assert_states_equal(load_state(single, 4), load_state(multi, 4), rtol=2e-4, atol=2e-6,
                      prefix="[")


def test_fsdp_parameters_train_like_replicated_ones(tmp_path, jax_cache):
  """8 devices with parameters and optimiser state split over 'data' (train.param_sharding
  = 'fsdp') give the 1-device replicated run; the checkpoint restores on one device."""
  from jaxrank.train import trainer

  single = str(tmp_path / "single")
  trainer.train(tiny_config(train__num_steps=2, train__checkpoint_every=2), single)
  fsdp = str(tmp_path / "fsdp")
  proc = subprocess.run(
    train_cmd("--workdir", fsdp, "--no_progress",
              *tiny_overrides(train__num_steps=2, train__checkpoint_every=2,
                              train__param_sharding="fsdp")),
    cwd=REPO, env=env(devices=8), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "fsdp:" in proc.stderr and "split over 8 devices" in proc.stderr
  assert " 0 of " not in proc.stderr
  assert_states_equal(load_state(single, 2), load_state(fsdp, 2), rtol=2e-4, atol=2e-6, prefix="[")
