"""Params-only export of a training run: ``python -m jaxrank.export --workdir RUN --out DIR``.

Writes ``config.json``, ``class_names.json``, ``export.json`` and ``weights.npz`` (the model
variables only, no optimiser state; see :mod:`jaxrank.inference`) to ``DIR``, which
``jaxrank.load_detector(DIR)`` and ``python -m jaxrank.predict --workdir DIR`` read. Exit
status: 0 written, 1 bad input (not a run folder, no readable checkpoint, ``DIR`` unusable),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m jaxrank.export",
    description="Writes a small, shareable params-only export of a training run.")
  parser.add_argument("--workdir", required=True, help="training run folder")
  parser.add_argument("--out", required=True, help="export folder (created)")
  parser.add_argument("--step", type=_non_negative_int, default=None,
                      help="checkpoint step (default: the latest readable one)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as e:  # argparse: bad arguments (2) or --help (0)
    return int(e.code or 0)
  from jaxrank.inference import export_detector

  try:
    out = export_detector(args.workdir, args.out, step=args.step)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
  print(f"exported {os.path.abspath(args.workdir)} -> {out} ({size / 2**20:.1f} MiB)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
