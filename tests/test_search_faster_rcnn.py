"""The search with a Faster R-CNN proxy: the 82-number mapping to the two heads' loss state,
the loop with a cheap stand-in for the proxies (outputs, written config, resume), and a tiny
real search (slow)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank import losses, models
from jaxrank.models import two_stage
from jaxrank.search import config as search_config
from jaxrank.search import proxy as proxy_lib
from jaxrank.search import runner
from jaxrank.search import space as space_lib
from jaxrank.train import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE = space_lib.FASTER_RCNN
RPN_TARGET = np.asarray(losses.PRESETS["faster_rcnn_rpn"].h1)
RCNN_TARGET = np.asarray(losses.PRESETS["faster_rcnn_rcnn"].h2)


class FakeProxy:
  """Reward: closeness of the sampled RPN f_H1 and R-CNN f_H2 knots to the published ones."""

  def run(self, loss_params, *, sequential=False, progress=True, should_stop=None, desc=""):
    assert isinstance(loss_params, two_stage.PAPState)
    assert loss_params.count.dtype == jnp.int32 and not np.any(loss_params.count)
    if should_stop is not None and should_stop():
      raise proxy_lib.Interrupted("stop requested")
    rewards = 1.0 - (np.mean((np.asarray(loss_params.rpn.h1) - RPN_TARGET) ** 2, axis=-1)
                     + np.mean((np.asarray(loss_params.rcnn.h2) - RCNN_TARGET) ** 2, axis=-1))
    k = len(rewards)
    return proxy_lib.ProxyResult(
        rewards=rewards.astype(np.float32), ap=rewards, ap50=rewards, failed=np.zeros(k, bool),
        bad_steps=np.zeros(k, int), final_loss=1.0 - rewards, train_time_s=0.0, eval_time_s=0.0)


def small_config(**search):
  c = search_config.faster_rcnn_synthetic_search_config()
  c.search.num_samples = 4
  c.search.ppo_steps = 20
  c.search.warmup_steps = 5
  c.search.plots = False
  c.search.progress_bar = False
  for k, v in search.items():
    c.search[k] = v
  return c


def test_space_of_the_proxies():
  assert search_config.validate(small_config()) is None
  assert space_lib.space_of(search_config.trainer_config(small_config())) is SPACE
  retina = search_config.synthetic_search_config()
  assert space_lib.space_of(search_config.trainer_config(retina)) is space_lib.RETINANET
  assert (SPACE.num_params, space_lib.RETINANET.num_params) == (82, 41)
  assert SPACE.grad_scale_indices == (80, 81) and space_lib.RETINANET.grad_scale_indices == (40,)
  assert SPACE.function_slice(0, "h2") == slice(0, 8)
  assert SPACE.function_slice(1, "h1") == slice(72, 80)


def test_82_numbers_round_trip_and_match_the_trainer():
  rng = np.random.default_rng(0)
  thetas = rng.uniform(0.05, 0.95, (3, 82)).astype(np.float32)
  state = SPACE.loss_state(thetas)
  assert isinstance(state, two_stage.PAPState)
  assert state.rpn.h1.shape == (3, 12) and state.count.shape == (3,)
  assert state.count.dtype == jnp.int32 and not np.any(state.count)
  rpn, rcnn = losses.faster_rcnn_params_from_theta(thetas)
  jax.tree.map(np.testing.assert_array_equal, (state.rpn, state.rcnn), (rpn, rcnn))
  np.testing.assert_allclose(state.rpn.grad_scale, 10.0 ** (2 * thetas[:, 80] - 1), rtol=1e-5)
  np.testing.assert_allclose(state.rcnn.grad_scale, 10.0 ** (2 * thetas[:, 81] - 1), rtol=1e-5)
  np.testing.assert_allclose(SPACE.theta_from_heads(SPACE.head_params(thetas)), thetas,
                             atol=2e-5)
  # The trainer maps loss.pap_theta to the same loss state (so the written config trains
  # with the searched functions).
  c = search_config.trainer_config(small_config())
  c.loss.pap_theta = tuple(float(v) for v in thetas[1])
  trained = models.init_loss_state(c.model, c.loss)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), trained,
               jax.tree.map(lambda x: x[1], state))
  with pytest.raises(ValueError, match="82"):
    SPACE.loss_state(thetas[:, :41])


def test_initial_means_and_fixed_grad_scales():
  c = small_config()
  theta = runner.initial_theta(c.search, SPACE)
  published = [0.2, 0.2, 0.25, 0.25, 0.3333, 0.3333, 0.5, 0.5] * 10 + [0.5, 0.5]
  np.testing.assert_allclose(theta, published, atol=1e-4)
  c.search.initial = "faster_rcnn"
  rpn, rcnn = SPACE.head_params(runner.initial_theta(c.search, SPACE))
  for got, name in ((rpn, "faster_rcnn_rpn"), (rcnn, "faster_rcnn_rcnn")):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), got,
                 jax.tree.map(np.float32, losses.PRESETS[name]))
  c = small_config(fixed_grad_scale=4.0)
  theta = runner.initial_theta(c.search, SPACE)
  np.testing.assert_allclose(theta[80:], losses.theta_from_reg_weight(4.0), rtol=1e-6)
  state = runner.loss_params(np.stack([theta, np.full(82, 0.9, np.float32)]), c.search)
  np.testing.assert_array_equal(state.rpn.grad_scale, 4.0)
  np.testing.assert_array_equal(state.rcnn.grad_scale, 4.0)


@pytest.mark.parametrize("make,initial", [
    (small_config, "retinanet"), (small_config, "faster_rcnn_rpn"),
    (search_config.synthetic_search_config, "faster_rcnn"),
])
def test_initial_names_by_proxy(make, initial):
  c = make()
  c.search.initial = initial
  with pytest.raises(config_lib.ConfigError, match="search.initial"):
    search_config.validate(c)


def test_cascade_rcnn_proxy_is_refused():
  c = small_config()
  c.model.name = "cascade_rcnn"
  with pytest.raises(config_lib.ConfigError, match="model.name"):
    space_lib.space_of(search_config.trainer_config(c))


def test_search_outputs_written_config_and_resume(tmp_path):
  workdir = str(tmp_path / "s")
  runner.search(small_config(num_rounds=3, max_rounds=2, plots=True), workdir, proxy=FakeProxy())
  result = runner.search(small_config(num_rounds=3), workdir, proxy=FakeProxy())
  straight = runner.search(small_config(num_rounds=3), str(tmp_path / "t"), proxy=FakeProxy())
  jax.tree.map(np.testing.assert_array_equal, result.state, straight.state)
  assert result.space is SPACE and result.theta.shape == (82,)
  for name in ("history.json", "search.png", "config.json", runner.RESULT_CONFIG):
    assert os.path.isfile(os.path.join(workdir, name)), name
  history = json.load(open(os.path.join(workdir, "history.json")))
  assert [h["round"] for h in history] == [1, 2, 3]
  assert all(np.shape(h["thetas"]) == (4, 82) and len(h["mean_theta"]) == 82 for h in history)

  for spec, theta in ((result.config_path, result.theta),
                      (result.config_path + ":best", np.asarray(result.state.best_theta))):
    c = config_lib.load_config_file(spec)
    config_lib.validate(c)
    assert (c.model.name, c.loss.name) == ("faster_rcnn", "pap")
    np.testing.assert_allclose(c.loss.pap_theta, theta, atol=1e-6)
    state = models.init_loss_state(c.model, c.loss)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 state, jax.tree.map(lambda x: x[0], SPACE.loss_state(theta[None])))
  # The search moved towards the published functions the stand-in rewards.
  reward = lambda t: FakeProxy().run(runner.loss_params(t[None], small_config().search)).rewards
  assert reward(result.theta) > reward(runner.initial_theta(small_config().search, SPACE))


def test_coco_target_writes_the_coco_recipe(tmp_path):
  path = runner.write_result_config(str(tmp_path / "c.py"), SPACE.initial_theta("identity"),
                                    target="coco", round_=1, num_rounds=40)
  c = config_lib.load_config_file(path)
  assert c.model.name == "faster_rcnn" and c.data.image_size == 512 and len(c.loss.pap_theta) == 82


def test_a_workdir_of_another_kind_of_search_is_refused(tmp_path):
  from test_search_runner import FakeProxy as RetinaFakeProxy
  from test_search_runner import small_config as retina_config
  workdir = str(tmp_path / "s")
  runner.search(retina_config(num_rounds=2, max_rounds=1), workdir, proxy=RetinaFakeProxy())
  with pytest.raises(config_lib.ConfigError, match="82 numbers"):
    runner.search(small_config(num_rounds=2), workdir, proxy=FakeProxy())


def test_packaged_configs_load():
  for name, rounds in (("search_synthetic_faster_rcnn", 3), ("search_coco_faster_rcnn", 40)):
    c = config_lib.load_config_file(os.path.join(REPO, "configs", f"{name}.py"))
    search_config.validate(c)
    assert space_lib.space_of(search_config.trainer_config(c)) is SPACE
    assert c.search.num_rounds == rounds and c.search.initial == "identity"
  c = config_lib.load_config_file(os.path.join(REPO, "configs", "search_coco_faster_rcnn.py"))
  assert (c.optimizer.lr, c.optimizer.lr_reference_batch_size, c.train.batch_size) == (0.024, 64,
                                                                                        64)
  assert (c.optimizer.warmup_steps, c.optimizer.schedule, c.train.num_epochs) == (500, "constant",
                                                                                  1)
  assert (c.search.num_samples, c.search.clip_eps, c.search.learning_rate,
          c.search.ppo_steps) == (8, 0.1, 0.01, 100)
  assert (c.loss.rpn_sampler, c.loss.rpn_num_samples) == ("random", 256)
  assert (c.loss.pap_rpn_preset, c.loss.pap_rcnn_preset) == ("identity", "identity")


def tiny_real_config(**search):
  c = small_config(num_samples=2, parallel="sequential", ppo_steps=5, **search)
  c.train.num_steps = 2
  c.data.num_train = 16
  c.data.num_val = 8
  c.eval.batch_size = 8
  return c


@pytest.mark.slow
def test_tiny_real_search_end_to_end_and_resume(tmp_path):
  """Two rounds of 2 tiny Faster R-CNN proxies (2 steps each), the second after a resume."""
  workdir = str(tmp_path / "s")
  config = tiny_real_config(num_rounds=2, max_rounds=1, plots=True)
  proxy = proxy_lib.ProxyTrainer(search_config.trainer_config(config))  # compiled once
  first = runner.search(config, workdir, proxy=proxy)
  assert len(first.history) == 1 and not any(first.history[0]["failed"])
  done = runner.search(tiny_real_config(num_rounds=2, plots=True), workdir, proxy=proxy)
  assert int(done.state.round) == 2 and [h["round"] for h in done.history] == [1, 2]
  assert done.history[0] == first.history[0]
  for name in ("history.json", "search.png", runner.RESULT_CONFIG, "checkpoints/2"):
    assert os.path.exists(os.path.join(workdir, name)), name
  c = config_lib.load_config_file(done.config_path)
  config_lib.validate(c)
  np.testing.assert_allclose(c.loss.pap_theta, done.theta, atol=1e-6)


@pytest.mark.slow
def test_vmapped_faster_rcnn_proxies_equal_sequential_ones():
  c = tiny_real_config()
  c.train.num_steps = 3
  proxy = proxy_lib.ProxyTrainer(search_config.trainer_config(c))
  state = SPACE.loss_state(np.stack([SPACE.initial_theta("identity"),
                                     SPACE.initial_theta("faster_rcnn")]))
  together = proxy.run(state, sequential=False, progress=False)
  apart = proxy.run(state, sequential=True, progress=False)
  np.testing.assert_allclose(together.final_loss, apart.final_loss, rtol=1e-4)
  assert np.all(together.bad_steps == apart.bad_steps) and not together.failed.any()
  assert abs(together.final_loss[0] - together.final_loss[1]) > 1e-3


def test_command_line_finds_the_config():
  out = subprocess.run([sys.executable, "-m", "jaxrank.search", "--config",
                        "search_synthetic_faster_rcnn", "--print_config"], cwd=str(REPO),
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "search_synthetic_faster_rcnn" in out.stdout and "pap_rpn_preset: identity" in out.stdout
