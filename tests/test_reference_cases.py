"""The published PyTorch implementations' outputs (../shared/reference), via the shared checker.

A file of its own so that the parallel test runner can run it beside the other loss tests.
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
    pytest.skip(f"{tool} not found: the shared/ folder is not beside this checkout")
  result = subprocess.run([sys.executable, tool], capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "reference cases match" in result.stdout.splitlines()[-1]
