"""Forward + backward time and memory of every ranking loss, as ratios to a sigmoid focal loss.

Usage:
  python benchmarks/losses.py            # N = 1e6, 8e6; P = 1000, 5000 (about 5 min on 2 CPU cores)
  python benchmarks/losses.py --quick    # N = 1e5, 1e6; P = 100, 1000 (under a minute)
  python benchmarks/losses.py --sizes 1e6 --positives 1000 --losses rank_sort_loss
  python benchmarks/losses.py --sizes 0  # only the tables without max_positives (below)

Inputs (as in issue 14): N logits from N(-2, 1.5), 10% of them ignored, and P positives with
logits from N(0, 1.5) and IoU targets from U(0.1, 1). Every loss runs as
``jax.jit(jax.value_and_grad(loss))`` with ``max_positives=P`` (the static slot count a training
step passes); the time is the best of ``--repeats`` runs after compilation. Two baselines are
measured in the same run on the same inputs:

* ``fused_focal``: the sigmoid focal loss (alpha 0.25, gamma 2) summed over the non-ignored
  entries, written as one ``jnp`` expression: the cost of one fused pass over the logits;
* ``optax_focal``: ``jaxrank.losses.sigmoid_focal_loss`` (optax's), summed the same way.

Columns: ``x fused`` and ``x optax`` divide a time by the baselines'. ``plan MiB`` is XLA's buffer
plan of the compiled step (arguments + temporaries + outputs, from ``memory_analysis()``), and
``plan x`` divides it by the fused focal loss's plan.

Two more tables follow (``--unbounded-size``, ``--memory-size``): the time of ``rank_sort_loss``
and ``ap_loss`` without ``max_positives`` under ``jit`` (traced targets: the slot count is then
N) against the bounded call, and the buffer plans of both at a large N (compiled, not run).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrank import losses


def fused_focal(x, y, **_):
  """Sigmoid focal loss as one ``jnp`` expression (alpha 0.25, gamma 2), summed."""
  t = (y > 0).astype(jnp.float32)
  p = jax.nn.sigmoid(x)
  ce = jnp.logaddexp(0.0, x) - x * t
  p_t = p * t + (1.0 - p) * (1.0 - t)
  alpha = 0.25 * t + 0.75 * (1.0 - t)
  return jnp.sum(jnp.where(y >= 0, alpha * ce * (1.0 - p_t) ** 2, 0.0))


def optax_focal(x, y, **_):
  return jnp.sum(losses.sigmoid_focal_loss(x, (y > 0).astype(jnp.float32), where=y >= 0))


def alrp(x, y, **kw):
  return losses.alrp_loss(x, y, jnp.full_like(x, 0.5), **kw)[0]


BASELINES = {"fused_focal": fused_focal, "optax_focal": optax_focal}
LOSSES = {
    "ap_loss": losses.ap_loss,
    "alrp_loss": alrp,
    "rank_sort_loss": losses.rank_sort_loss,
    "bucketed_ap_loss": losses.bucketed_ap_loss,
    "bucketed_rank_sort_loss": losses.bucketed_rank_sort_loss,
}
UNBOUNDED = ("rank_sort_loss", "ap_loss")


def inputs(n, p, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(-2.0, 1.5, size=n).astype(np.float32)
  targets = np.zeros(n, np.float32)
  targets[rng.random(n) < 0.1] = -1.0
  chosen = rng.choice(n, size=p, replace=False)
  targets[chosen] = rng.uniform(0.1, 1.0, size=p).astype(np.float32)
  logits[chosen] = rng.normal(0.0, 1.5, size=p).astype(np.float32)
  return jnp.asarray(logits), jnp.asarray(targets)


def step(fn, max_positives):
  kw = {} if max_positives is None else {"max_positives": max_positives}
  return jax.jit(jax.value_and_grad(lambda a, b: fn(a, b, **kw)))


def plan_bytes(compiled):
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
          + analysis.output_size_in_bytes)


def measure(fn, x, y, max_positives, repeats):
  compiled = step(fn, max_positives).lower(x, y).compile()
  jax.block_until_ready(compiled(x, y))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(x, y))
    best = min(best, time.perf_counter() - start)
  return best, plan_bytes(compiled)


def plan_only(fn, n, max_positives):
  shape = jax.ShapeDtypeStruct((n,), jnp.float32)
  return plan_bytes(step(fn, max_positives).lower(shape, shape).compile())


def mib(b):
  return "n/a" if b is None else f"{b / 2**20:.0f}"


def ratio(a, b):
  return "n/a" if a is None or not b else f"{a / b:.2f}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=None,
                      help="comma-separated N (default 1e6,8e6; 0 skips the main table)")
  parser.add_argument("--positives", default=None, help="comma-separated P (default 1000,5000)")
  parser.add_argument("--losses", default=",".join(LOSSES))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--unbounded-size", type=float, default=None,
                      help="N of the unbounded-vs-bounded timing (default 1e6; 0 skips it)")
  parser.add_argument("--memory-size", type=float, default=None,
                      help="N of the unbounded-vs-bounded buffer plans (default 2e7; 0 skips)")
  parser.add_argument("--quick", action="store_true", help="small sizes, for a quick look")
  args = parser.parse_args(argv)
  default_sizes, default_positives = ("1e5,1e6", "100,1000") if args.quick else ("1e6,8e6",
                                                                                  "1000,5000")
  sizes = [n for n in (int(float(s)) for s in (args.sizes or default_sizes).split(",")) if n > 0]
  positives = [int(p) for p in (args.positives or default_positives).split(",")]
  unbounded_size = int(args.unbounded_size if args.unbounded_size is not None
                       else (1e5 if args.quick else 1e6))
  memory_size = int(args.memory_size if args.memory_size is not None
                    else (1e6 if args.quick else 2e7))
  names = [n for n in args.losses.split(",") if n]
  unknown = sorted(set(names) - set(LOSSES))
  if unknown:
    parser.error(f"unknown losses {unknown}; expected some of {sorted(LOSSES)}")

  device = jax.devices()[0]
  print(f"backend: {jax.default_backend()} ({device.device_kind}), jax {jax.__version__}")
  print(f"{'N':>9} {'P':>5} {'loss':<24} {'fwd+bwd ms':>11} {'x fused':>8} {'x optax':>8} "
        f"{'plan MiB':>9} {'plan x':>7}")
  for n in sizes:
    for p in positives:
      x, y = inputs(n, p)
      base = {}
      for name, fn in BASELINES.items():
        base[name] = measure(fn, x, y, None, args.repeats)
      for name in list(BASELINES) + names:
        fn = BASELINES.get(name) or LOSSES[name]
        t, plan = base[name] if name in base else measure(fn, x, y, p, args.repeats)
        print(f"{n:>9} {p:>5} {name:<24} {t * 1e3:>11.1f} {t / base['fused_focal'][0]:>8.2f} "
              f"{t / base['optax_focal'][0]:>8.2f} {mib(plan):>9} "
              f"{ratio(plan, base['fused_focal'][1]):>7}", flush=True)
      del x, y

  unbounded = [u for u in UNBOUNDED if u in names]
  p = 1000
  if unbounded_size and unbounded:
    print(f"\nwithout max_positives under jit (slots = N), N = {unbounded_size}, P = {p}")
    print(f"{'loss':<24} {'bounded ms':>11} {'unbounded ms':>13} {'ratio':>6} "
          f"{'x fused':>8} {'plan MiB b/u':>13}")
    x, y = inputs(unbounded_size, p)
    focal_time = measure(fused_focal, x, y, None, args.repeats)[0]
    for name in unbounded:
      tb, pb = measure(LOSSES[name], x, y, p, args.repeats)
      tu, pu = measure(LOSSES[name], x, y, None, args.repeats)
      print(f"{name:<24} {tb * 1e3:>11.1f} {tu * 1e3:>13.1f} {tu / tb:>6.2f} "
            f"{tu / focal_time:>8.2f} {mib(pb) + '/' + mib(pu):>13}", flush=True)
    del x, y
  if memory_size and unbounded:
    print(f"\nXLA buffer plans (compiled, not run), N = {memory_size}, P = {p}")
    print(f"{'loss':<24} {'bounded MiB':>12} {'unbounded MiB':>14} {'ratio':>6} "
          f"{'x fused focal':>14}")
    focal_plan = plan_only(fused_focal, memory_size, None)
    print(f"{'fused_focal':<24} {mib(focal_plan):>12}")
    for name in unbounded:
      pb = plan_only(LOSSES[name], memory_size, p)
      pu = plan_only(LOSSES[name], memory_size, None)
      print(f"{name:<24} {mib(pb):>12} {mib(pu):>14} {ratio(pu, pb):>6} "
            f"{ratio(pb, focal_plan):>14}", flush=True)


if __name__ == "__main__":
  main()
