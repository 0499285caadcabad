"""The trainer never loses a run: resume from the run's config, checkpoints the config cannot
hold, non-finite states, unwritable folders, config errors, progress lines."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrank.train import checkpoints as ckpt_lib
from jaxrank.train import config as config_lib
from jaxrank.train import steps as steps_lib
from jaxrank.train import trainer
from jaxrank.train.__main__ import main

from test_train_helpers import (  # noqa: F401
  checkpoint_steps,
  jax_cache,
  load_state,
  tiny_config,
  tiny_overrides,
)

pytestmark = pytest.mark.usefixtures("jax_cache")


def _listing(workdir):
  return sorted(os.path.relpath(os.path.join(d, f), workdir)
                for d, _, files in os.walk(os.path.join(workdir, "checkpoints")) for f in files)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 2-step run made with a non-default config (focal + smooth L1, 64 px)."""
  workdir = str(tmp_path_factory.mktemp("run") / "run")
  code = main(["--workdir", workdir, "--no_progress",
               *tiny_overrides(train__num_steps=2, train__checkpoint_every=0)])
  assert code == 0
  return workdir


def _copy(run, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(run, dst)
  return dst


def test_resume_uses_the_runs_saved_config_and_names_overrides(finished_run, tmp_path, capfd):
  workdir = _copy(finished_run, tmp_path)
  saved = json.load(open(os.path.join(workdir, "config.json")))
  code = main(["--workdir", workdir, "--no_progress", "--config.train.num_steps=3",
               "--config.optimizer.lr=0.002"])
  err = capfd.readouterr().err
  assert code == 0, err
  assert "resumed from checkpoint step 2" in err
  assert "train.num_steps: 2 -> 3" in err and "optimizer.lr: 0.001 -> 0.002" in err
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "corrupt"))
  now = json.load(open(os.path.join(workdir, "config.json")))
  assert now["loss"]["name"] == saved["loss"]["name"] == "focal_smooth_l1"
  assert now["model"]["fpn_channels"] == saved["model"]["fpn_channels"] == 16
  assert json.load(open(os.path.join(workdir, "config.step_2.json"))) == saved
  assert checkpoint_steps(workdir) == [2, 3]


def test_a_change_the_checkpoint_cannot_hold_stops_and_touches_nothing(finished_run, tmp_path,
                                                                       capfd):
  workdir = _copy(finished_run, tmp_path)
  before = _listing(workdir)
  config_before = open(os.path.join(workdir, "config.json")).read()
  code = main(["--workdir", workdir, "--no_progress", "--config.model.fpn_channels=8",
               "--config.train.num_steps=4"])
  err = capfd.readouterr().err
  assert code == 2, err
  assert "model.fpn_channels: 16 -> 8" in err and "Nothing was changed" in err
  assert _listing(workdir) == before
  assert open(os.path.join(workdir, "config.json")).read() == config_before


def test_a_checkpoint_restoring_nan_is_set_aside_and_the_previous_one_used(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  config = tiny_config(train__num_steps=2, train__checkpoint_every=1)
  trainer.train(config, workdir)
  # Step 3 as a damaged data file would restore it: a NaN optimiser leaf.
  tx, _ = trainer.optim.build_optimizer(config.optimizer, global_batch_size=8, total_steps=2,
                                        steps_per_epoch=4)
  mesh = trainer.shard_lib.make_mesh()
  resolved = trainer.resolve_config(config, num_devices=1, steps_per_epoch=4)
  _, abstract = steps_lib.abstract_state(resolved, tx, mesh)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=0,
                                       keep=10)
  state, meta = checkpointer.restore(2, abstract)
  leaves, treedef = jax.tree.flatten(state["opt_state"])
  bad = [i for i, x in enumerate(leaves) if x.dtype.kind == "f"][-1]
  leaves[bad] = jnp.full_like(leaves[bad], jnp.nan)
  checkpointer.save(3, {**state, "opt_state": jax.tree.unflatten(treedef, leaves)},
                    {**meta, "batch_in_epoch": 3})
  checkpointer.close()
  with caplog.at_level("WARNING", logger="jaxrank"):
    result = trainer.train(tiny_config(train__num_steps=4, train__checkpoint_every=1), workdir)
  assert "step 3" in caplog.text and "NaN or inf" in caplog.text
  assert result.metrics["resumed_from"] == 2
  assert os.listdir(os.path.join(workdir, "checkpoints", "corrupt"))
  saved = load_state(workdir, 4)
  assert all(np.all(np.isfinite(v)) for v in saved.values() if v.dtype.kind == "f")


def test_a_step_with_a_non_finite_update_leaves_the_state_unchanged():
  config = tiny_config()
  mesh = trainer.shard_lib.make_mesh(jax.devices()[:1])
  resolved = trainer.resolve_config(config, num_devices=1, steps_per_epoch=4)
  graphdef, init = steps_lib.init_state(resolved, mesh)
  tx = optax.sgd(1e-3, momentum=float("nan"))
  state = {**init, "opt_state": tx.init(init["params"])}
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(2, 64, 64, 3)).astype(np.float32),
           "boxes": np.array([[[4, 4, 40, 40]] * 8] * 2, np.float32),
           "labels": np.zeros((2, 8), np.int32), "box_mask": np.ones((2, 8), bool),
           "valid": np.ones((2,), bool), "image_id": np.arange(2)}
  new_state, metrics = jax.jit(steps_lib.train_step_fn(graphdef, tx))(state, batch)
  assert np.isfinite(metrics["loss"]) and not bool(metrics["finite"])
  for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("key,value", [
    ("optimizer.momentum", "nan"), ("eval.iou_threshold", "nan"), ("eval.iou_threshold", "1.5"),
    ("optimizer.lr", "inf"), ("eval.score_threshold", "-0.1"),
])
def test_non_finite_or_out_of_range_settings_are_config_errors(key, value):
  config = tiny_config()
  config_lib.apply_override(config, key, value)
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(config)


def test_an_unwritable_checkpoint_folder_fails_at_the_first_save(tmp_path, capfd):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("not a folder")
  code = main(["--workdir", str(workdir), "--no_progress",
               *tiny_overrides(train__num_steps=2, train__checkpoint_every=1)])
  err = capfd.readouterr().err
  assert code == 1, err
  assert str(workdir / "checkpoints") in err and "Traceback" not in err


@pytest.mark.parametrize("spec,message", [
    ("synthetic:nope", "got 'nope'"),
    ("no_such_config", "config file not found"),
])
def test_config_file_errors_exit_2(spec, message, capfd):
  assert main(["--config", spec, "--print_config"]) == 2
  assert message in capfd.readouterr().err


def test_a_failing_get_config_exits_2(tmp_path, capfd):
  path = tmp_path / "broken.py"
  path.write_text("def get_config():\n  raise KeyError('boom')\n")
  assert main(["--config", str(path), "--print_config"]) == 2
  assert "get_config() failed: KeyError" in capfd.readouterr().err


def test_packaged_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch, capfd):
  monkeypatch.chdir(tmp_path)
  assert main(["--list_configs"]) == 0
  listing = capfd.readouterr().out
  assert "default" in listing and "coco_atss_rs" in listing
  assert main(["--config", "synthetic:alrp", "--print_config"]) == 0
  assert "alrp" in capfd.readouterr().out
  assert main(["--print_config"]) == 0  # the packaged default
  assert "rank_sort" in capfd.readouterr().out


def test_progress_lines_without_a_progress_bar(finished_run):
  log = open(os.path.join(finished_run, "train.log")).read()
  assert "step 1/2:" in log and "step 2/2:" in log and "lr " in log and "img/s" in log
  assert "ETA" in log
