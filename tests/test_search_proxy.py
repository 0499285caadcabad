"""Proxy trainings: vmapped over the loss parameters == one after another."""

import numpy as np
import pytest

from jaxrank import losses
from jaxrank.search import config as search_config
from jaxrank.search import proxy as proxy_lib
from jaxrank.search import runner


@pytest.mark.slow
def test_vmapped_proxies_equal_sequential_ones():
  c = search_config.synthetic_search_config()
  c.train.num_steps = 3
  c.data.num_train = 16
  c.data.num_val = 8
  c.data.image_size = 48
  proxy = proxy_lib.ProxyTrainer(search_config.trainer_config(c))
  thetas = np.stack([np.asarray(losses.theta_from_params(losses.PRESETS[name]))
                     for name in ("identity", "retinanet")])
  params = runner.loss_params(thetas, c.search)
  together = proxy.run(params, sequential=False, progress=False)
  apart = proxy.run(params, sequential=True, progress=False)
  np.testing.assert_allclose(together.final_loss, apart.final_loss, rtol=1e-4)
  np.testing.assert_allclose(together.rewards, apart.rewards, atol=2e-3)
  assert together.rewards.shape == (2,) and not together.failed.any()
  assert np.all(together.bad_steps == apart.bad_steps)
  # The two losses train differently.
  assert abs(together.final_loss[0] - together.final_loss[1]) > 1e-3


SHARDED_SCRIPT = """
import numpy as np, jax
from jaxrank import losses
from jaxrank.search import config as search_config, proxy as proxy_lib, runner
assert len(jax.devices()) == 2
c = search_config.synthetic_search_config()
c.train.num_steps = 2; c.data.num_train = 16; c.data.num_val = 8; c.data.image_size = 48
proxy = proxy_lib.ProxyTrainer(search_config.trainer_config(c))
thetas = np.stack([np.asarray(losses.theta_from_params(losses.PRESETS[n])) for n in ("identity", "retinanet")])
params = runner.loss_params(thetas, c.search)
assert proxy_lib.proxy_mesh(2).devices.size == 2
together = proxy.run(params, progress=False)
apart = proxy.run(params, sequential=True, progress=False)
np.testing.assert_allclose(together.final_loss, apart.final_loss, rtol=1e-4)
print("OK")
"""  # noqa: E501


@pytest.mark.slow
def test_proxies_sharded_over_two_devices():
  import os
  import subprocess
  import sys
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                       text=True)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
