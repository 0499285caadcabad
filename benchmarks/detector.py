"""Train-step time and peak memory of every published recipe of a detector family on a
ResNet-FPN detector, as ratios to the family's baseline (focal + smooth L1 for RetinaNet /
ATSS, cross-entropy + L1 for Faster / Cascade R-CNN, the focal set loss for Deformable DETR,
Co-DETR's focal recipe for Co-DETR).

Each recipe runs in its own subprocess (so peak memory is its own): a jitted step of the
trainer's step (``detector.loss`` through :mod:`jaxrank.train.steps`) with SGD momentum,
timed after warm-up as the median of ``--steps`` steps, on random images with ``--boxes``
random boxes per image.

  python benchmarks/detector.py                       # ResNet-50-FPN, 512x512, batch 2
  python benchmarks/detector.py --backbone resnet18 --image-size 256 --steps 3
  python benchmarks/detector.py --loss-only --detector atss   # the losses alone
  python benchmarks/detector.py --family-model faster_rcnn --detector faster_rcnn  # two-stage
  python benchmarks/detector.py --family-model faster_rcnn --detector faster_rcnn \
      --rpn-sampler all --rcnn-sampler all_with_gt    # the same anchors and RoIs for every loss
  python benchmarks/detector.py --family-model deformable_detr --steps 3   # query-based
  python benchmarks/detector.py --family-model co_deformable_detr --steps 3   # Co-DETR
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

#: The baseline every family's ratios are taken to.
REFERENCES = ("focal_smooth_l1", "faster_rcnn_ce_smooth_l1", "detr_focal", "co_detr_focal")


def child(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from jaxrank import models
  from jaxrank.train import steps as steps_lib

  name = args.recipe
  model_config, loss_config = models.recipe_config(name)
  if args.detector != "published":
    model_config = models.default_model_config(args.detector)
  model_config.update(backbone=args.backbone, image_size=args.image_size,
                      num_classes=args.num_classes, dtype=args.dtype)
  for field, value in (("alrp_period", 100), ("max_positives_per_image", args.max_positives),
                       ("rpn_sampler", args.rpn_sampler), ("rcnn_sampler", args.rcnn_sampler)):
    if field in loss_config and value is not None:
      loss_config[field] = value
  detector = models.build_detector(model_config, loss_config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(detector, nnx.Param, ...)
  tx = optax.sgd(1e-3, momentum=0.9)

  rng = np.random.default_rng(0)
  b, m, s = args.batch, args.boxes, args.image_size
  xy = rng.uniform(0, 0.7 * s, (b, m, 2))
  wh = rng.uniform(0.05 * s, 0.3 * s, (b, m, 2))
  batch = {
      "image": jnp.asarray(rng.normal(size=(b, s, s, 3)), jnp.float32),
      "boxes": jnp.asarray(np.concatenate([xy, np.minimum(xy + wh, s)], -1), jnp.float32),
      "labels": jnp.asarray(rng.integers(0, args.num_classes, (b, m)), jnp.int32),
      "box_mask": jnp.ones((b, m), bool),
      "valid": jnp.ones((b,), bool),
      "image_id": jnp.arange(b, dtype=jnp.int32),
  }
  train_step = steps_lib.train_step_fn(graphdef, tx)

  @jax.jit
  def step(params, opt_state, loss_state, batch):
    state = {"params": params, "rest": rest, "opt_state": opt_state, "loss_state": loss_state}
    state, metrics = train_step(state, batch)
    return state["params"], state["opt_state"], state["loss_state"], metrics

  if args.loss_only:
    # The dense family's own loss function on random head outputs.
    from jaxrank.models import dense

    static = detector.static_info()

    @jax.jit
    def step(outputs, opt_state, loss_state, batch):
      f = lambda o: dense.detection_loss(static, o, batch, detector.loss_settings, loss_state)
      (loss, (metrics, loss_state)), grads = jax.value_and_grad(f, has_aux=True)(outputs)
      return grads, opt_state, loss_state, metrics

  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  opt_state, loss_state = tx.init(params), models.init_loss_state(model_config, loss_config)
  if args.loss_only:
    opt_state = None
    outputs = jax.eval_shape(lambda p: nnx.merge(graphdef, p, rest)(batch["image"]), params)
    keys = jax.random.split(jax.random.key(0))
    params = dense.DetectorOutputs(
        jax.random.normal(keys[0], outputs.class_logits.shape) - 4.0,
        0.5 * jax.random.normal(keys[1], outputs.box_deltas.shape))
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, loss_state, batch).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    params, opt_state, loss_state, metrics = compiled(params, opt_state, loss_state, batch)
    jax.block_until_ready(params)
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {
      "recipe": name,
      "detector": model_config.name,
      "anchors": int(np.asarray(detector.anchors).shape[0]) if hasattr(detector, "anchors")
                 else None,
      "step_ms": 1e3 * float(np.median(times)),
      "compile_s": compile_s,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "rss_before_mb": rss_before / 1024,
      "device_peak_mb": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
      "num_positives": float(metrics["num_positives"]),
      "loss": float(metrics["loss"]),
      "platform": device.platform,
  }


def main(argv=None):
  from jaxrank import models

  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--image-size", type=int, default=512)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--backbone", default="resnet50")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  parser.add_argument("--family-model", default="retinanet", choices=models.model_names(),
                      help="a model name of the detector family whose loss recipes to run")
  parser.add_argument("--recipes", nargs="+", default=None,
                      help="recipe names (default: every recipe of the family)")
  parser.add_argument("--detector", default="published",
                      choices=("published",) + models.model_names(),
                      help="each recipe's published detector, or one detector for all")
  parser.add_argument("--num-classes", type=int, default=80)
  parser.add_argument("--boxes", type=int, default=10, help="random gt boxes per image")
  parser.add_argument("--max-positives", type=int, default=1000,
                      help="loss_config.max_positives_per_image")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--rpn-sampler", choices=("random", "all"), default=None,
                      help="two-stage: one RPN sampler for every recipe (default: published)")
  parser.add_argument("--rcnn-sampler", choices=("random", "all", "all_with_gt"), default=None,
                      help="two-stage: one RoI sampler for every recipe, so that only the loss "
                           "differs (default: each recipe's published sampler)")
  parser.add_argument("--loss-only", action="store_true",
                      help="time only value_and_grad of the loss w.r.t. random head outputs")
  parser.add_argument("--recipe", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.recipe:
    print(json.dumps(child(args)))
    return

  family = models.family_of({"name": args.family_model})
  if args.loss_only and family.name != "dense":
    parser.error("--loss-only times the dense family's loss function on random head outputs")
  own = list(family.recipe_names)
  if family.name == "query_based":  # Deformable DETR and Co-DETR recipes apart
    own = [r for r in own if models.recipe_config(r)[0].name == args.family_model]
  recipes = list(args.recipes or own)
  unknown = sorted(set(recipes) - set(family.recipe_names))
  if unknown:
    parser.error(f"unknown recipes {unknown}; the {family.name} family has "
                 f"{family.recipe_names}")
  reference_name = next((r for r in REFERENCES if r in own), None)
  if reference_name is not None and reference_name not in recipes:
    recipes.insert(0, reference_name)
  passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
  if "--recipes" in passthrough:
    i = passthrough.index("--recipes")
    j = i + 1
    while j < len(passthrough) and not passthrough[j].startswith("--"):
      j += 1
    del passthrough[i:j]
  what = "loss only (value_and_grad w.r.t. head outputs)" if args.loss_only else "train step"
  print(f"{what}: {args.backbone}-FPN, {args.image_size}x{args.image_size}, batch {args.batch}, "
        f"{args.boxes} boxes/image, {args.num_classes} classes, {args.dtype}, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
        + "".join(f", {k} {v}" for k, v in (("RPN sampler", args.rpn_sampler),
                                             ("RoI sampler", args.rcnn_sampler)) if v),
        flush=True)
  rows = []
  for name in recipes:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough,
                           "--recipe", name], capture_output=True, text=True)
    if proc.returncode:
      print(f"{name}: failed\n{proc.stderr[-3000:]}", flush=True)
      continue
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    r = rows[-1]
    print(f"  {name}: {r['step_ms']:.0f} ms/step (compile {r['compile_s']:.0f} s)", flush=True)

  reference = next((r for r in rows if r["recipe"] == reference_name), None)
  short = "x CE" if reference_name == "faster_rcnn_ce_smooth_l1" else "x focal"
  header = (f"{'recipe':<32} {'detector':<12} {'anchors':>8} {'#pos':>6} {'step ms':>9} "
            f"{short:>8} {'peak RSS MB':>12} {short:>8} {'device MB':>10} "
            f"{'compile s':>10}")
  print(f"\nplatform: {rows[0]['platform'] if rows else '?'}\n{header}\n{'-' * len(header)}")
  for r in rows:
    t_ratio = r["step_ms"] / reference["step_ms"] if reference else float("nan")
    m_ratio = r["peak_rss_mb"] / reference["peak_rss_mb"] if reference else float("nan")
    device = f"{r['device_peak_mb']:.0f}" if r["device_peak_mb"] else "n/a"
    print(f"{r['recipe']:<32} {r['detector']:<12} {r['anchors'] or 0:>8} "
          f"{r['num_positives']:>6.0f} "
          f"{r['step_ms']:>9.1f} {t_ratio:>8.2f} {r['peak_rss_mb']:>12.0f} {m_ratio:>8.2f} "
          f"{device:>10} {r['compile_s']:>10.1f}")


if __name__ == "__main__":
  main()
