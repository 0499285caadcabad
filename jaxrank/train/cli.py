"""Command-line plumbing shared by ``python -m jaxrank.train`` and ``python -m jaxrank.eval``:
``--config FILE[:ARG]`` plus ``--config.a.b=value`` (or ``--config.a.b value``) overrides,
logging setup and error reporting."""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
from collections.abc import Sequence

import jaxrank.configs as configs_package
from jaxrank.train import config as config_lib


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """Separates ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` overrides from the other
  arguments."""
  overrides, rest = [], []
  i = 0
  argv = list(argv)
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" in body:
        key, value = body.split("=", 1)
      else:
        if i + 1 >= len(argv):
          raise config_lib.ConfigError(f"override --config.{body} has no value")
        key, value = body, argv[i + 1]
        i += 1
      if not key:
        raise config_lib.ConfigError(f"empty config key in {arg!r}")
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("multi-host")
  g.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() with cluster auto-detection "
                      "(also done automatically when JAX_COORDINATOR_ADDRESS or a SLURM "
                      "job with several tasks is found)")
  g.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  g.add_argument("--num_processes", type=int, default=None)
  g.add_argument("--process_id", type=int, default=None)


def packaged_configs() -> dict[str, str]:
  """``{name: path}`` of the config files that ship with jaxrank (the repository's
  ``configs/``, installed as the package ``jaxrank.configs``)."""
  folder = os.path.dirname(os.path.abspath(configs_package.__file__))
  return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
          if f.endswith(".py") and not f.startswith("_")}


def config_summary(path: str) -> str:
  """The first line of a config file's docstring."""
  with open(path, encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def resolve_config_spec(spec: str | None, default: str = "default") -> str:
  """A config file spec ``FILE[:ARG]``: ``spec`` itself when its file exists, else the packaged
  config of that name (``NAME[:ARG]`` or ``configs/NAME.py[:ARG]``, e.g. ``synthetic:alrp``;
  see ``--list_configs``). None: the packaged ``default``."""
  spec = spec or default
  path, arg = (spec, "") if os.path.exists(spec) or ":" not in spec else spec.rsplit(":", 1)
  if os.path.isfile(path):
    return spec
  configs = packaged_configs()
  folder, name = os.path.split(path)
  name = name[:-3] if name.endswith(".py") else name
  if name in configs and os.path.normpath(folder or "configs") == "configs":
    return configs[name] + (f":{arg}" if arg else "")
  raise config_lib.ConfigError(
    f"config file not found: {path} (nor a packaged config of that name; known: "
    f"{', '.join(configs)}; see --list_configs)")


def print_config_list() -> None:
  for name, path in packaged_configs().items():
    print(f"{name:<28} {config_summary(path)}")


def load_config(spec: str | None, overrides: Sequence[tuple[str, str]], *,
                default: str = "default"):
  config = config_lib.load_config_file(resolve_config_spec(spec, default))
  config_lib.apply_overrides(config, overrides)
  return config


def load_run_config(workdir: str, overrides: Sequence[tuple[str, str]]):
  """A run's saved ``config.json`` with ``overrides`` applied (None when the run folder has
  none)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"cannot read the run's config {path}: {e}") from None
  config = config_lib.from_dict(saved)
  config_lib.apply_overrides(config, overrides)
  return config


def setup_logging(workdir: str | None = None, *, verbose: bool = False) -> None:
  """INFO logs of jaxrank to stderr (and ``<workdir>/train.log``); quieter libraries."""
  fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
  # jaxrank's loggers get their own handler (libraries may configure the root logger).
  pkg = logging.getLogger("jaxrank")
  pkg.propagate = False
  pkg.setLevel(logging.INFO)
  if not any(getattr(h, "_jaxrank", False) and not isinstance(h, logging.FileHandler)
             for h in pkg.handlers):
    handler = _TqdmHandler()
    handler.setFormatter(fmt)
    handler._jaxrank = True
    pkg.addHandler(handler)
  root = logging.getLogger()
  if root.level > logging.WARNING or root.level == logging.NOTSET:
    root.setLevel(logging.WARNING)
  for name in ("absl", "orbax", "jax", "etils", "tensorstore", "matplotlib", "PIL"):
    logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
  for handler in [h for h in pkg.handlers if isinstance(h, logging.FileHandler)]:
    pkg.removeHandler(handler)  # a previous run's train.log (several runs in one process)
    handler.close()
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    fh = logging.FileHandler(os.path.join(workdir, "train.log"))
    fh.setFormatter(fmt)
    fh._jaxrank = True
    pkg.addHandler(fh)
  try:  # absl logs through its own handler once initialised; keep it quiet.
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
  except ImportError:
    pass


class _TqdmHandler(logging.StreamHandler):
  """Writes through tqdm so that log lines do not break the progress bar."""

  def __init__(self):
    super().__init__(sys.stderr)

  def emit(self, record):
    if getattr(record, "file_only", False):  # progress lines while a progress bar shows
      return
    try:
      from tqdm import tqdm

      tqdm.write(self.format(record), file=sys.stderr)
      self.flush()
    except Exception:
      self.handleError(record)


def fail(prog: str, message: str, code: int) -> int:
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  return code
