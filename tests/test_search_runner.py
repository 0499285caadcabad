"""The search loop: resume == uninterrupted, outputs, interruption, config errors (with a cheap
stand-in for the proxy trainings), and one real round through the command line."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxrank import losses
from jaxrank.search import config as search_config
from jaxrank.search import proxy as proxy_lib
from jaxrank.search import runner
from jaxrank.train import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = np.asarray(losses.PRESETS["retinanet"].h2)


class FakeProxy:
  """Reward: closeness of the sampled f_H2 knots to the published RetinaNet ones."""

  def __init__(self, stop_after_calls=None):
    self.calls = 0
    self.stop_after_calls = stop_after_calls

  def run(self, loss_params, *, sequential=False, progress=True, should_stop=None, desc=""):
    self.calls += 1
    if should_stop is not None and should_stop():
      raise proxy_lib.Interrupted("stop requested")
    h2 = np.asarray(loss_params.h2)
    rewards = 1.0 - np.mean((h2 - TARGET) ** 2, axis=-1)
    k = len(rewards)
    return proxy_lib.ProxyResult(
        rewards=rewards.astype(np.float32), ap=rewards, ap50=rewards, failed=np.zeros(k, bool),
        bad_steps=np.zeros(k, int), final_loss=1.0 - rewards, train_time_s=0.0, eval_time_s=0.0)


def small_config(**search):
  c = search_config.synthetic_search_config()
  c.search.num_samples = 4
  c.search.ppo_steps = 20
  c.search.warmup_steps = 5
  c.search.plots = False
  c.search.progress_bar = False
  for k, v in search.items():
    c.search[k] = v
  return c


def test_resumed_search_equals_uninterrupted(tmp_path):
  straight = runner.search(small_config(num_rounds=4, max_rounds=3), str(tmp_path / "a"),
                           proxy=FakeProxy())
  runner.search(small_config(num_rounds=4, max_rounds=2), str(tmp_path / "b"), proxy=FakeProxy())
  resumed = runner.search(small_config(num_rounds=4, max_rounds=1), str(tmp_path / "b"),
                          proxy=FakeProxy())
  assert int(resumed.state.round) == int(straight.state.round) == 3
  jax.tree.map(np.testing.assert_array_equal, resumed.state, straight.state)
  assert [h["rewards"] for h in resumed.history] == [h["rewards"] for h in straight.history]
  assert [h["thetas"] for h in resumed.history] == [h["thetas"] for h in straight.history]
  # The finished search runs no further round.
  done = runner.search(small_config(num_rounds=4, max_rounds=0), str(tmp_path / "a"),
                       proxy=FakeProxy())
  assert int(done.state.round) == 4 and len(done.history) == 4


def test_outputs_and_written_config(tmp_path):
  workdir = str(tmp_path / "s")
  result = runner.search(small_config(num_rounds=3, plots=True), workdir, proxy=FakeProxy())
  for name in ("history.json", "search.png", "config.json", runner.RESULT_CONFIG):
    assert os.path.isfile(os.path.join(workdir, name)), name
  history = json.load(open(os.path.join(workdir, "history.json")))
  assert [h["round"] for h in history] == [1, 2, 3]
  assert all(len(h["thetas"]) == 4 and len(h["thetas"][0]) == 41 for h in history)
  np.testing.assert_allclose(history[-1]["mean_theta"], result.theta, atol=1e-5)

  for spec, theta in ((result.config_path, result.theta),
                      (result.config_path + ":best", np.asarray(result.state.best_theta))):
    c = config_lib.load_config_file(spec)
    config_lib.validate(c)
    assert c.loss.name == "pap"
    np.testing.assert_allclose(c.loss.pap_theta, theta, atol=1e-6)
  assert float(result.state.best_reward) == pytest.approx(max(max(h["rewards"]) for h in history),
                                                          abs=1e-6)


def test_search_moves_towards_higher_reward(tmp_path):
  config = small_config(num_rounds=8, num_samples=8, ppo_steps=100, warmup_steps=30)
  result = runner.search(config, str(tmp_path / "s"), proxy=FakeProxy())

  def reward(theta):
    return FakeProxy().run(runner.loss_params(theta.reshape(1, -1), config.search)).rewards[0]

  assert reward(result.theta) > reward(runner.initial_theta(config.search))


def test_interrupted_round_is_not_saved_and_resumes(tmp_path):
  from jaxrank.train.checkpoints import TerminationRequest
  workdir = str(tmp_path / "s")
  runner.search(small_config(num_rounds=3, max_rounds=1), workdir, proxy=FakeProxy())
  terminate = TerminationRequest(())
  terminate.request()
  with pytest.raises(proxy_lib.Interrupted):
    runner.search(small_config(num_rounds=3), workdir, proxy=FakeProxy(), terminate=terminate)
  resumed = runner.search(small_config(num_rounds=3), workdir, proxy=FakeProxy())
  straight = runner.search(small_config(num_rounds=3), str(tmp_path / "t"), proxy=FakeProxy())
  jax.tree.map(np.testing.assert_array_equal, resumed.state, straight.state)


def test_fixed_grad_scale():
  c = small_config(fixed_grad_scale=4.0)
  theta = runner.initial_theta(c.search)
  params = runner.loss_params(np.stack([theta, theta * 0 + 0.9]), c.search)
  np.testing.assert_allclose(params.grad_scale, 4.0)


@pytest.mark.parametrize("key,value,match", [
    ("search.num_samples", 1, "num_samples"), ("search.parallel", "threads", "parallel"),
    ("search.initial", "faster_rcnn_rpn", "initial"),
    ("search.fixed_grad_scale", 20.0, "fixed_grad_scale"),
    ("search.sigma0", 0.0, "sigma0"), ("loss.name", "rank_sort", "loss.name"),
    ("search.rounds", 3, "unknown"),
])
def test_invalid_search_config(key, value, match):
  c = small_config()
  section, field = key.split(".")
  with c[section].unlocked():
    c[section][field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    search_config.validate(c)


def test_search_command_line_one_round(tmp_path):
  """One real round of 2 tiny proxies (vmapped), then a resume that finishes the search."""
  workdir = tmp_path / "search"
  args = [sys.executable, "-m", "jaxrank.search", "--config",
          os.path.join(REPO, "configs", "search_synthetic.py"), "--workdir", str(workdir),
          "--no_progress", "--config.search.num_rounds=2", "--config.search.max_rounds=1",
          "--config.search.num_samples=2", "--config.search.parallel=vmap",
          "--config.train.num_steps=2", "--config.data.num_train=16", "--config.data.num_val=8",
          "--config.data.image_size=32", "--config.search.ppo_steps=5"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "1 of 2 rounds" in out.stdout
  for name in ("history.json", "search.png", "searched_config.py", "search.log", "checkpoints/1"):
    assert (workdir / name).exists(), name
  bad = subprocess.run(args[:5] + ["--config.search.num_sampels=3"], cwd=REPO, env=env,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "num_sampels" in bad.stderr


def test_resume_with_a_changed_config_warns(tmp_path, caplog, monkeypatch):
  import logging
  monkeypatch.setattr(logging.getLogger("jaxrank"), "propagate", True)
  workdir = str(tmp_path / "s")
  runner.search(small_config(num_rounds=3, max_rounds=1), workdir, proxy=FakeProxy())
  with caplog.at_level(logging.WARNING, logger="jaxrank.search"):
    runner.search(small_config(num_rounds=3, max_rounds=1), workdir, proxy=FakeProxy())
  assert not [r for r in caplog.records if "differs" in r.getMessage()]
  config = small_config(num_rounds=3, max_rounds=1)
  config.train.num_steps = 99
  with caplog.at_level(logging.WARNING, logger="jaxrank.search"):
    runner.search(config, workdir, proxy=FakeProxy())
  assert any("train.num_steps" in r.getMessage() for r in caplog.records)
