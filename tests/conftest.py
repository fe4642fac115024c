"""Shared fixtures: offline switches on, egress guard on, tiny artifacts built once per session."""

from __future__ import annotations

import os
import tempfile

import pytest

from homeforge.security import egress

egress.set_offline_env()
egress.install()
os.environ.setdefault("OMP_NUM_THREADS", "2")
# keys and the audit log go to a throwaway home, never the developer's (security/audit.py)
os.environ.setdefault("HOMEFORGE_HOME", tempfile.mkdtemp(prefix="homeforge-test-home-"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small quickstart dataset artifact (stdlib docstrings, 512-token BPE)."""
    from rich.console import Console

    from homeforge.config import QuickstartConfig, load_config
    from homeforge.quickstart import build_dataset

    out = tmp_path_factory.mktemp("ds") / "data"
    cfg = load_config(QuickstartConfig, overrides=["corpus.max_chars=200000", "tokenizer.vocab_size=512"])
    return build_dataset(cfg, out, force=False, console=Console(quiet=True))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dataset):
    from homeforge.models.io import load_tokenizer

    return load_tokenizer(tiny_dataset / "tokenizer")


@pytest.fixture(autouse=True)
def _grad_mode_is_left_alone():
    """Fail the test that leaves autograd switched off globally (it silently broke every later training test)."""
    import sys

    yield
    torch = sys.modules.get("torch")
    if torch is not None and not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test (or the code it ran) left torch's global grad mode off; use `with torch.no_grad():`")
