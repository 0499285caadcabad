"""``python -m jaxrank.eval``: COCO evaluation of a training checkpoint.

Examples::

  python -m jaxrank.eval --workdir runs/default-20250101-120000             # latest step
  python -m jaxrank.eval --workdir runs/default-... --checkpoint 1000
  python -m jaxrank.eval --config configs/coco_atss_rs.py --checkpoint_dir ckpts/ \\
      --config.data.val_images=/data/coco/val2017 \\
      --config.data.val_annotations=/data/coco/annotations/instances_val2017.json

With ``--workdir`` the run's ``config.json`` is used (``--config.KEY=VALUE`` overrides it,
e.g. ``--config.eval.score_threshold=0.01``). Prints AP, AP50, AP75, APs/m/l and per-class
AP, and writes ``detections.json`` (COCO results format), ``metrics.json``,
``summary.txt`` and plots into ``--output_dir`` (default ``<workdir>/eval/step_<N>``).
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "python -m jaxrank.eval"


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  from jaxrank.train import cli
  from jaxrank.train import config as config_lib

  try:
    overrides, rest = cli.split_overrides(argv)
  except config_lib.ConfigError as e:
    return cli.fail(PROG, str(e), 2)
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default=None, help="training run folder")
  parser.add_argument("--config", default=None,
                      help="config file or packaged config name (default: <workdir>/config.json)")
  parser.add_argument("--checkpoint_dir", default=None,
                      help="checkpoint folder (default: <workdir>/checkpoints)")
  parser.add_argument("--checkpoint", type=int, default=None,
                      help="step to evaluate (default: the latest)")
  parser.add_argument("--output_dir", default=None)
  parser.add_argument("--no_plots", action="store_true")
  parser.add_argument("--no_progress", action="store_true")
  cli.add_distributed_args(parser)
  args = parser.parse_args(rest)
  if args.workdir is None and (args.config is None or args.checkpoint_dir is None):
    return cli.fail(PROG, "give --workdir, or --config and --checkpoint_dir", 2)

  from jaxrank.train import sharding

  sharding.maybe_initialize_distributed(
    coordinator_address=args.coordinator_address, num_processes=args.num_processes,
    process_id=args.process_id, force=args.distributed,
  )
  import jax

  try:
    if args.config is not None:
      config = cli.load_config(args.config, overrides)
    else:
      config = cli.load_run_config(args.workdir, overrides)
      if config is None:
        path = os.path.join(args.workdir, "config.json")
        return cli.fail(PROG, f"{path} not found; is {args.workdir!r} a training run folder?", 1)
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    return cli.fail(PROG, str(e), 2)
  checkpoint_dir = args.checkpoint_dir or os.path.join(args.workdir, "checkpoints")
  output_dir = args.output_dir  # default: <checkpoint_dir>/../eval/step_<N>
  cli.setup_logging()

  from jaxrank.data import CorruptImageError
  from jaxrank.train import checkpoints, trainer

  try:
    summary = trainer.evaluate_checkpoint(
      config, checkpoint_dir, step=args.checkpoint, output_dir=output_dir,
      plots_enabled=not args.no_plots, progress=not args.no_progress,
    )
  except (FileNotFoundError, CorruptImageError, checkpoints.NoUsableCheckpointError) as e:
    return cli.fail(PROG, str(e), 1)
  except (config_lib.ConfigError, checkpoints.IncompatibleCheckpointError) as e:
    return cli.fail(PROG, str(e), 2)
  except ValueError as e:
    return cli.fail(PROG, f"{type(e).__name__}: {e}", 1)
  if jax.process_index() == 0:
    print(summary["summary"])
    print(f"step {summary['step']}: AP {summary['AP']:.4f}  AP50 {summary['AP50']:.4f}  "
          f"AP75 {summary['AP75']:.4f}  APs {summary['APs']:.4f}  APm {summary['APm']:.4f}  "
          f"APl {summary['APl']:.4f}")
    for name, ap in summary["per_class_AP"].items():
      print(f"  AP[{name}] = {ap:.4f}")
    print(f"detections and metrics written to {summary['output_dir']}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
