"""``python -m jaxrank.train``: train a detector.

Examples::

  python -m jaxrank.train                                   # the packaged 'default' config
  python -m jaxrank.train --list_configs                    # the packaged configs
  python -m jaxrank.train --config synthetic:alrp --workdir runs/alrp
  python -m jaxrank.train --config configs/coco_atss_rs.py \\
      --config.data.train_images=/data/coco/train2017 ... --config.train.batch_size=32
  python -m jaxrank.train --workdir runs/alrp              # resume an interrupted run

Resuming (``--workdir`` of an existing run without ``--config``) uses the run's saved
``config.json``; ``--config.KEY=VALUE`` overrides apply on top and are named in the log. A
change the checkpoints cannot hold (other shapes or structure) stops with exit status 2 and
changes nothing in the run folder.

Exit status: 0 done, 1 bad data or other error, 2 bad config or arguments, 3 non-finite
loss (nan_policy 'stop' or too many skipped steps), 143 / 130 stopped by SIGTERM / SIGINT
(Ctrl-C) after saving a checkpoint (run again with the same --workdir to resume; a second
signal exits at once).
"""

from __future__ import annotations

import argparse
import logging
import sys

PROG = "python -m jaxrank.train"


def parse_args(argv):
  from jaxrank.train import cli

  overrides, rest = cli.split_overrides(argv)
  parser = argparse.ArgumentParser(
    prog=PROG,
    description="Train a detector with a ranking-based loss. Config overrides: "
                "--config.SECTION.FIELD=VALUE (e.g. --config.train.num_steps=100).",
    epilog="Config sections: model, loss, data, optimizer, train, eval. "
           "Use --print_config to see every field.",
  )
  parser.add_argument("--config", default=None,
                      help="config file with get_config() (FILE or FILE:ARG) or the name of a "
                           "packaged config (NAME or NAME:ARG, see --list_configs); default "
                           "'default', or the run's saved config.json when --workdir holds one")
  parser.add_argument("--workdir", default=None,
                      help="run folder; resumes from its checkpoints if any (default "
                           "runs/<config name>-<timestamp>)")
  parser.add_argument("--list_configs", action="store_true",
                      help="list the packaged configs and exit")
  parser.add_argument("--print_config", action="store_true",
                      help="print the resolved config and exit")
  parser.add_argument("--no_progress", action="store_true",
                      help="no progress bar: a text line every train.log_every steps on stderr")
  parser.add_argument("--verbose", action="store_true", help="library INFO logs too")
  cli.add_distributed_args(parser)
  args = parser.parse_args(rest)
  return args, overrides


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  from jaxrank.train import cli
  from jaxrank.train import config as config_lib

  try:
    args, overrides = parse_args(argv)
  except config_lib.ConfigError as e:
    return cli.fail(PROG, str(e), 2)
  if args.list_configs:
    cli.print_config_list()
    return 0

  from jaxrank.train import sharding

  try:
    sharding.maybe_initialize_distributed(
      coordinator_address=args.coordinator_address, num_processes=args.num_processes,
      process_id=args.process_id, force=args.distributed,
    )
  except Exception as e:
    return cli.fail(PROG, f"jax.distributed.initialize failed: {e}", 1)

  import jax

  try:
    config = None
    if args.workdir is not None and args.config is None:
      config = cli.load_run_config(args.workdir, overrides)
    if config is None:
      config = cli.load_config(args.config, overrides)
    if args.no_progress:
      config.train.progress_bar = False
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    return cli.fail(PROG, str(e), 2)
  if args.print_config:
    print(config)
    return 0

  from jaxrank.data import CorruptImageError
  from jaxrank.train import checkpoints, trainer

  if args.workdir is None and jax.process_count() > 1:
    return cli.fail(PROG, "a multi-host run needs an explicit --workdir", 2)
  workdir = args.workdir or trainer.default_workdir(config)
  cli.setup_logging(workdir if jax.process_index() == 0 else None, verbose=args.verbose)
  log = logging.getLogger("jaxrank.train")
  try:
    result = trainer.train(config, workdir)
  except config_lib.ConfigError as e:
    return cli.fail(PROG, str(e), 2)
  except trainer.NonFiniteLossError as e:
    return cli.fail(PROG, str(e), 3)
  except trainer.TrainingInterrupted as e:
    log.warning("%s", e)
    return 128 + e.signum
  except (FileNotFoundError, CorruptImageError, checkpoints.NoUsableCheckpointError,
          checkpoints.CheckpointWriteError) as e:
    return cli.fail(PROG, str(e), 1)
  except (ValueError, ImportError) as e:
    return cli.fail(PROG, f"{type(e).__name__}: {e}", 1)
  except KeyboardInterrupt:
    return cli.fail(PROG, "interrupted", 130)
  if jax.process_index() == 0:
    m = result.metrics
    print(
      f"finished {config.name}: step {result.step}, AP {m.get('AP', float('nan')):.4f}, "
      f"AP50 {m.get('AP50', float('nan')):.4f}, training {m.get('train_time_s', 0):.0f}s, "
      f"total {m.get('total_time_s', 0):.0f}s -> {result.workdir}",
      flush=True,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
