"""COCO AP of published recipes trained on the built-in synthetic data at equal steps.

Each recipe trains ``configs/synthetic.py:RECIPE`` (tiny backbone, 96 px shapes) for ``--steps``
steps in its own subprocess and is evaluated on the synthetic validation split; the table gives
AP, AP50, AP75 and the wall time of the run (compilation and evaluation included).

  python benchmarks/synthetic_recipes.py --family-model faster_rcnn       # every two-stage recipe
  python benchmarks/synthetic_recipes.py --family-model deformable_detr --steps 2400
  python benchmarks/synthetic_recipes.py --family-model co_deformable_detr --steps 2400
  python benchmarks/synthetic_recipes.py --recipes rank_sort alrp --steps 800
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def main(argv=None):
  from jaxrank import models

  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family-model", default="faster_rcnn", choices=models.model_names(),
                      help="a model name of the family whose recipes to train")
  parser.add_argument("--recipes", nargs="+", default=None,
                      help="recipe names (default: every recipe of the family)")
  parser.add_argument("--steps", type=int, default=1600, help="training steps of every recipe")
  args = parser.parse_args(argv)
  family = models.family_of({"name": args.family_model})
  own = list(family.recipe_names)
  if family.name == "query_based":  # Deformable DETR and Co-DETR recipes apart
    own = [r for r in own if models.recipe_config(r)[0].name == args.family_model]
  recipes = list(args.recipes or own)
  unknown = sorted(set(recipes) - set(models.recipe_names()))
  if unknown:
    parser.error(f"unknown recipes {unknown}")
  print(f"synthetic data, {args.steps} steps of batch 8 per recipe", flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for recipe in recipes:
      workdir = os.path.join(tmp, recipe)
      start = time.perf_counter()
      proc = subprocess.run(
          [sys.executable, "-m", "jaxrank.train", "--config", f"synthetic:{recipe}",
           f"--config.train.num_steps={args.steps}", f"--config.train.eval_every={args.steps}",
           "--config.train.checkpoint_every=0", "--config.train.plots=False", "--no_progress",
           "--workdir", workdir], capture_output=True, text=True)
      wall = time.perf_counter() - start
      if proc.returncode:
        print(f"{recipe}: failed\n{proc.stderr[-3000:]}", flush=True)
        continue
      with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
      final = metrics["final"]
      rows.append((recipe, final, wall))
      print(f"  {recipe}: AP {final['AP']:.3f} in {wall / 60:.1f} min", flush=True)
  print(f"\n{'recipe':<34} {'AP':>6} {'AP50':>6} {'AP75':>6} {'wall min':>9}")
  for recipe, m, wall in rows:
    print(f"{recipe:<34} {m['AP']:>6.3f} {m['AP50']:>6.3f} {m['AP75']:>6.3f} {wall / 60:>9.1f}")


if __name__ == "__main__":
  main()
