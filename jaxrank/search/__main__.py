"""``python -m jaxrank.search``: search the Parameterized AP Loss functions.

Examples::

  python -m jaxrank.search --config configs/search_synthetic.py --workdir runs/search
  python -m jaxrank.search --workdir runs/search --config configs/search_synthetic.py  # resume
  python -m jaxrank.train --config runs/search/searched_config.py                     # use it

Writes to the work directory: ``checkpoints/`` (search state per round), ``history.json``,
``search.png``, ``searched_config.py``, ``search.log``. Exit status: 0 done, 1 bad data or
other error, 2 bad config or arguments, 143 / 130 stopped by SIGTERM / SIGINT (the rounds
completed so far are saved; run again with the same --workdir to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

PROG = "python -m jaxrank.search"
DEFAULT_CONFIG = "search_synthetic"


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  from jaxrank.train import cli
  from jaxrank.train import config as config_lib

  try:
    overrides, rest = cli.split_overrides(argv)
  except config_lib.ConfigError as e:
    return cli.fail(PROG, str(e), 2)
  parser = argparse.ArgumentParser(
      prog=PROG, description="Search Parameterized AP Loss functions with proxy trainings. "
                             "Overrides: --config.SECTION.FIELD=VALUE "
                             "(e.g. --config.search.max_rounds=2).",
      epilog="Sections: search, and the proxy's model, loss, data, optimizer, train, eval.")
  parser.add_argument("--config", default=None,
                      help=f"search config file (FILE or FILE:ARG) or packaged config name; "
                           f"default {DEFAULT_CONFIG}")
  parser.add_argument("--workdir", default=None,
                      help="search folder; resumes from its checkpoints "
                           "(default runs/search-<time>)")
  parser.add_argument("--print_config", action="store_true")
  parser.add_argument("--no_progress", action="store_true")
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(rest)

  from jaxrank.search import config as search_config

  try:
    config = cli.load_config(args.config, overrides, default=DEFAULT_CONFIG)
    if args.no_progress:
      config.search.progress_bar = False
    search_config.validate(config)
  except config_lib.ConfigError as e:
    return cli.fail(PROG, str(e), 2)
  if args.print_config:
    print(config)
    return 0

  from jaxrank.data import CorruptImageError
  from jaxrank.search import proxy, runner
  from jaxrank.train import checkpoints

  workdir = args.workdir or os.path.join("runs", f"search-{time.strftime('%Y%m%d-%H%M%S')}")
  cli.setup_logging(None, verbose=args.verbose)
  os.makedirs(workdir, exist_ok=True)
  handler = logging.FileHandler(os.path.join(workdir, "search.log"))
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                         "%H:%M:%S"))
  logging.getLogger("jaxrank").addHandler(handler)
  log = logging.getLogger("jaxrank.search")
  terminate = checkpoints.TerminationRequest((signal.SIGTERM, signal.SIGINT))
  try:
    with terminate:
      result = runner.search(config, workdir, terminate=terminate)
  except proxy.Interrupted as e:
    log.warning("%s: %s; completed rounds are saved in %s", signal.Signals(terminate.signum).name
                if terminate.signum else "stopped", e, workdir)
    return 128 + int(terminate.signum or signal.SIGTERM)
  except config_lib.ConfigError as e:
    return cli.fail(PROG, str(e), 2)
  except (FileNotFoundError, CorruptImageError, checkpoints.NoUsableCheckpointError) as e:
    return cli.fail(PROG, str(e), 1)
  except (ValueError, ImportError) as e:
    return cli.fail(PROG, f"{type(e).__name__}: {e}", 1)
  h = result.history[-1] if result.history else None
  print(f"search: {len(result.history)} of {int(result.state.num_rounds)} rounds"
        + (f", last round reward mean {h['mean_reward']:.4f}, best {h['best_reward']:.4f}"
           if h else "")
        + f" -> {result.config_path}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
