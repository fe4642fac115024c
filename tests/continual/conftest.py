"""Fixtures of the continual-learning tests: the serving fixtures, a throwaway home with a data key."""

from __future__ import annotations

import pytest

from serve.conftest import running_server, tiny_classifier_dir, tiny_model_dir  # noqa: F401  (reused)


@pytest.fixture
def keyed_home(tmp_path, monkeypatch):
    """A throwaway HOMEFORGE_HOME with a data key (the feedback log is encrypted with it)."""
    from homeforge.security import keys

    h = tmp_path / "home"
    monkeypatch.setenv("HOMEFORGE_HOME", str(h))
    for var in ("HOMEFORGE_KEY", "HOMEFORGE_KEY_FILE", "HOMEFORGE_KEY_COMMAND", "HOMEFORGE_AUDIT_LOG",
                "HOMEFORGE_ENCRYPT"):
        monkeypatch.delenv(var, raising=False)
    keys.init_key()
    return h
