"""Parameterized AP Loss search on the built-in synthetic data (configs/search_synthetic.py).

Prints, in one run on one machine:

1. the wall time of ``--rounds`` search rounds (8 proxy trainings each, compilation
   included) and the rewards per round;
2. the held-out COCO AP of proxies trained with the identity start, the searched policy
   mean and the best sampled vector (same proxy, same initial weights and batches);
3. the time of one round of 8 proxies run as one vmapped computation and one after another
   (both compiled beforehand), and their ratio.

  python benchmarks/search.py                      # ~20 min on a 2-core CPU
  python benchmarks/search.py --rounds 2 --steps 50 --skip-compare   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrank.search import config as search_config  # noqa: E402
from jaxrank.search import policy, runner  # noqa: E402
from jaxrank.search import proxy as proxy_lib  # noqa: E402
from jaxrank.train import cli  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=0, help="proxy steps (default: the config's)")
  parser.add_argument("--workdir", default=None, help="search folder (default: a temporary one)")
  parser.add_argument("--skip-compare", action="store_true",
                      help="skip the vmap vs sequential round")
  parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
  args = parser.parse_args()
  cli.setup_logging(None)

  config = search_config.synthetic_search_config()
  if args.steps:
    config.train.num_steps = args.steps
  config.search.max_rounds = args.rounds
  config.search.progress_bar = False
  workdir = args.workdir or tempfile.mkdtemp(prefix="jaxrank-search-")
  print(f"devices: {jax.devices()}; backend {jax.default_backend()}; {os.cpu_count()} CPUs")
  print(f"proxy: {config.train.num_steps} steps x batch {config.train.batch_size} at "
        f"{config.data.image_size} px, {config.data.num_train} search-train / "
        f"{config.data.num_val} "
        f"held-out images; {config.search.num_samples} samples per round; workdir {workdir}")

  t0 = time.time()
  proxy = proxy_lib.ProxyTrainer(search_config.trainer_config(config),
                                 abort_after=int(config.search.abort_after))
  result = runner.search(config, workdir, proxy=proxy, progress=False)
  search_time = time.time() - t0
  figures = {"rounds": len(result.history), "search_time_s": round(search_time, 1),
             "round_rewards": [h["rewards"] for h in result.history]}
  print(f"\n{len(result.history)} rounds in {search_time / 60:.1f} min "
        f"(parallel={config.search.parallel} -> "
        f"{'sequential' if runner.use_sequential(config.search) else 'vmap'})")
  for h in result.history:
    print(f"  round {h['round']}: reward mean {h['mean_reward']:.4f} max {max(h['rewards']):.4f}, "
          f"{h['round_time_s']:.0f}s")

  # Identity start vs the searched parameters, trained and scored by the same proxy.
  names = ["identity start", "searched (policy mean)", "best sample"]
  thetas = jnp.stack([jnp.asarray(runner.initial_theta(config.search)), jnp.asarray(result.theta),
                      jnp.asarray(result.state.best_theta)])
  final = proxy.run(runner.loss_params(thetas, config.search), sequential=True, progress=False)
  print("\nheld-out COCO AP after the proxy training:")
  for name, ap, ap50 in zip(names, final.ap, final.ap50):
    print(f"  {name:24s} AP {ap:.4f}  AP50 {ap50:.4f}")
  figures["final_ap"] = dict(zip(names, np.asarray(final.ap).round(4).tolist()))

  if not args.skip_compare:
    s = result.state
    thetas = policy.sample(jax.random.key(12345), s.mu_logit, s.sigma,
                           int(config.search.num_samples))
    params = runner.loss_params(thetas, config.search)
    steps = proxy.num_steps
    proxy.num_steps = 1  # compile both ways first
    proxy.run(params, sequential=False, progress=False)
    proxy.run(params, sequential=True, progress=False)
    proxy.num_steps = steps
    times = {}
    for mode, sequential in (("vmap", False), ("sequential", True)):
      t = time.time()
      r = proxy.run(params, sequential=sequential, progress=False)
      times[mode] = time.time() - t
      print(f"\none round, {mode}: {times[mode]:.1f}s (train {r.train_time_s:.1f}s, eval "
            f"{r.eval_time_s:.1f}s), AP {np.round(r.ap, 4).tolist()}")
    ratio = times["sequential"] / times["vmap"]
    print(f"vmapped round speed-up over sequential: {ratio:.2f}x")
    figures.update(round_vmap_s=round(times["vmap"], 1),
                   round_sequential_s=round(times["sequential"], 1),
                   vmap_speedup=round(ratio, 2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=1)


if __name__ == "__main__":
  main()
