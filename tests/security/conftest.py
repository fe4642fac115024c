"""Fixtures of the security tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A throwaway HOMEFORGE_HOME (no keys unless the test makes them)."""
    h = tmp_path / "home"
    monkeypatch.setenv("HOMEFORGE_HOME", str(h))
    for var in ("HOMEFORGE_KEY", "HOMEFORGE_KEY_FILE", "HOMEFORGE_KEY_COMMAND", "HOMEFORGE_AUDIT_LOG",
                "HOMEFORGE_AUDIT_KEY_FILE", "HOMEFORGE_ENCRYPT"):
        monkeypatch.delenv(var, raising=False)
    return h
