"""Forward + backward time and memory of every loss, as a ratio to a sigmoid focal loss.

Usage: python benchmarks/losses.py [--sizes 1e5,1e6,8e6] [--positives 100,1000,5000] [--repeats 3]

For each (N, P): random logits, P positives with IoU targets, 10% ignored. Each loss runs as
``jax.jit(jax.value_and_grad(loss))`` with ``max_positives=P`` (the static slot count a training
step passes); the time is the best of ``--repeats`` runs after compilation, and the ratio divides
it by the focal loss's time measured in the same run on the same logits. Memory is XLA's buffer
plan for the compiled step (arguments + temporaries + outputs), and the device's peak bytes in
use where the backend reports them (GPU/TPU).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrank import losses


def focal(x, y, **_):
  return jnp.sum(losses.sigmoid_focal_loss(x, (y > 0).astype(jnp.float32), where=y >= 0))


def alrp(x, y, **kw):
  return losses.alrp_loss(x, y, jnp.full_like(x, 0.5), **kw)[0]


LOSSES = {
    "focal": focal,
    "ap_loss": losses.ap_loss,
    "alrp_loss": alrp,
    "rank_sort_loss": losses.rank_sort_loss,
    "bucketed_ap_loss": losses.bucketed_ap_loss,
    "bucketed_rank_sort_loss": losses.bucketed_rank_sort_loss,
}


def inputs(n, p, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=n).astype(np.float32)
  targets = np.zeros(n, np.float32)
  targets[rng.random(n) < 0.1] = -1.0
  chosen = rng.choice(n, size=p, replace=False)
  targets[chosen] = rng.uniform(0.1, 1.0, size=p).astype(np.float32)
  logits[chosen] += 1.0
  return jnp.asarray(logits), jnp.asarray(targets)


def measure(fn, x, y, p, repeats):
  step = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b, max_positives=p)))
  compiled = step.lower(x, y).compile()
  analysis = compiled.memory_analysis()
  plan = None
  if analysis is not None:
    plan = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
            + analysis.output_size_in_bytes)
  jax.block_until_ready(compiled(x, y))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(x, y))
    best = min(best, time.perf_counter() - start)
  stats = jax.devices()[0].memory_stats() or {}
  return best, plan, stats.get("peak_bytes_in_use")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="1e5,1e6,8e6")
  parser.add_argument("--positives", default="100,1000,5000")
  parser.add_argument("--losses", default=",".join(LOSSES))
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  sizes = [int(float(s)) for s in args.sizes.split(",")]
  positives = [int(p) for p in args.positives.split(",")]
  names = args.losses.split(",")
  if "focal" not in names:
    names.insert(0, "focal")
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
  print(f"{'N':>9} {'P':>5} {'loss':<24} {'fwd+bwd ms':>11} {'x focal':>8} "
        f"{'XLA plan MiB':>13} {'peak MiB':>9}")
  for n in sizes:
    for p in positives:
      x, y = inputs(n, p)
      focal_time = None
      for name in names:
        t, plan, peak = measure(LOSSES[name], x, y, p, args.repeats)
        focal_time = t if name == "focal" else focal_time
        plan_mib = f"{plan / 2**20:.0f}" if plan is not None else "n/a"
        peak_mib = f"{peak / 2**20:.0f}" if peak is not None else "n/a"
        print(f"{n:>9} {p:>5} {name:<24} {t * 1e3:>11.1f} {t / focal_time:>8.2f} "
              f"{plan_mib:>13} {peak_mib:>9}", flush=True)


if __name__ == "__main__":
  main()
