"""The published PyTorch implementations' outputs (../shared/reference), via the shared checker.

A file of its own so that the parallel test runner can run it beside the other loss tests. Skipped
when ../shared is missing, except under CI (the environment variable ``CI`` set), where that fails.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")


def test_reference_cases():
  """The published PyTorch implementations' outputs (../shared/reference)."""
  tool = os.path.join(SHARED, "tools", "check_reference.py")
  if not os.path.exists(tool):
    message = f"{tool} not found: the shared/ folder is not beside this checkout"
    if os.environ.get("CI"):
      pytest.fail(message + " (CI is set: the reference check must run)")
    pytest.skip(message)
  result = subprocess.run([sys.executable, tool], capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "reference cases match" in result.stdout.splitlines()[-1]
