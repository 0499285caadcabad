"""The full default run (``python -m jaxrank.train`` with no config arguments): a benchmark,
deselected by default. Run with ``pytest -m slow tests/test_train_default_run.py``."""

from __future__ import annotations

import json
import os
import time

import pytest

from test_train_helpers import run, train_cmd


@pytest.mark.slow
def test_default_run_reaches_ap_0_5(tmp_path):
  workdir = tmp_path / "default"
  t0 = time.time()
  # The default config, no cache: a cold start as a user would see it.
  proc = run(train_cmd("--workdir", str(workdir), "--no_progress"),
             env_extra={"JAX_COMPILATION_CACHE_DIR": ""})
  wall = time.time() - t0
  assert proc.returncode == 0, proc.stderr[-4000:]
  final = json.load(open(workdir / "metrics.json"))["final"]
  print(f"default run: AP {final['AP']:.4f} AP50 {final['AP50']:.4f} in {wall:.0f}s "
        f"(training {final['train_time_s']:.0f}s), load average {os.getloadavg()}")
  assert final["AP"] >= 0.5
  for name in ("config.json", "metrics.json", "detections_val.json", "plots/loss_curves.png",
               "plots/pr_curve.png", "plots/val_detections.png"):
    assert (workdir / name).exists(), name
