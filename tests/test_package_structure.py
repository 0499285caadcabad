"""Package hygiene: no private names imported across modules, no import cycles, and
``jaxrank.losses`` imports nothing beyond jax and numpy."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "jaxrank")


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, f), REPO)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        out[".".join(rel)] = os.path.join(folder, f)
  return out


MODULES = _modules()


def _imports(name: str, path: str):
  """``(module imported, names)`` of every import statement in a module."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, []
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      yield base, [alias.name for alias in node.names]


def _edges(name: str, path: str) -> set[str]:
  out = set()
  for module, names in _imports(name, path):
    if not module.startswith("jaxrank"):
      continue
    targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    out.update(targets or [module])
  return out - {name}


def test_no_private_names_imported_from_other_modules():
  bad = []
  for name, path in MODULES.items():
    for module, names in _imports(name, path):
      if not module.startswith("jaxrank") or module.rpartition(".")[2].startswith("_"):
        continue
      bad += [f"{name}: from {module} import {n}" for n in names
              if n.startswith("_") and f"{module}.{n}" not in MODULES]
  assert not bad, bad


def test_no_import_cycles():
  graph = {name: _edges(name, path) for name, path in MODULES.items()}
  state: dict[str, int] = {}
  cycles = []

  def visit(node, stack):
    state[node] = 1
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt in graph and nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  # A package's __init__ importing its own submodules is not a cycle.
  cycles = [c for c in cycles if not all(c[0].startswith(m) or m.startswith(c[0]) for m in c)]
  assert not cycles, cycles


def test_losses_import_only_jax_and_numpy():
  code = ("import sys, jaxrank.losses; print(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'flax', 'optax', 'orbax', 'tensorflow', 'tensorflow_datasets', 'pycocotools', "
          "'ml_collections', 'matplotlib'}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       check=True).stdout.strip()
  assert out == "[]"


def test_docstring_examples_outside_the_losses():
  import doctest
  import importlib

  for name in ("jaxrank.validation", "jaxrank.models", "jaxrank.models.dense",
               "jaxrank.models.two_stage", "jaxrank.models.query_based"):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted and not result.failed, (name, result)


def test_pyproject_ships_every_package():
  """A non-editable install ships only the packages listed in pyproject.toml."""
  import tomllib

  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
  found = {os.path.relpath(root, REPO).replace(os.sep, ".")
           for root, _, files in os.walk(os.path.join(REPO, "jaxrank"))
           if "__init__.py" in files}
  assert found <= listed, sorted(found - listed)
