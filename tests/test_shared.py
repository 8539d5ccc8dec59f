"""`require_shared` (tests/conftest.py): a test that reads ../shared fails in CI when it is missing,
and is skipped elsewhere."""

from __future__ import annotations

import pytest


def test_a_present_path_is_returned(tmp_path, require_shared):
    assert require_shared(tmp_path) == tmp_path


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_missing_path_fails_in_ci(tmp_path, require_shared, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="missing: CI must mount ../shared") as failed:
        require_shared(tmp_path / "absent.zip")
    assert "absent.zip" in str(failed.value) and "\n" not in str(failed.value)


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_a_missing_path_is_skipped_elsewhere(tmp_path, require_shared, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="absent.zip is missing"):
        require_shared(tmp_path / "absent.zip")
