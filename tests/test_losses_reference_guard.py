"""tests/test_reference_cases.py fails (does not skip) under CI when ../shared is missing."""

import pytest

import test_reference_cases


def test_missing_shared_fails_under_ci(monkeypatch, tmp_path):
  monkeypatch.setattr(test_reference_cases, "SHARED", str(tmp_path / "no-shared"))
  monkeypatch.setenv("CI", "true")
  with pytest.raises(pytest.fail.Exception, match="CI"):
    test_reference_cases.test_reference_cases()


def test_missing_shared_skips_outside_ci(monkeypatch, tmp_path):
  monkeypatch.setattr(test_reference_cases, "SHARED", str(tmp_path / "no-shared"))
  monkeypatch.delenv("CI", raising=False)
  with pytest.raises(pytest.skip.Exception):
    test_reference_cases.test_reference_cases()
