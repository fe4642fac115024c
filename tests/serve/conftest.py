"""Fixtures for serving tests: a tiny model directory and a real uvicorn server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory):
    """A debug-preset Llama with the quickstart tokenizer, saved as a model directory.

    A wider initialisation than usual makes the random model's greedy outputs varied
    (not one repeated token), so batching mistakes show up as different tokens.
    """
    from homeforge.models.io import save_model_dir
    from homeforge.models.presets import build_model, preset_config

    tok = tiny_tokenizer
    cfg = preset_config("debug", len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, overrides={"initializer_range": 0.3})
    model = build_model(cfg, seed=0)
    out = tmp_path_factory.mktemp("serve") / "tiny-llama"
    save_model_dir(model, tok, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(cfg, keys=None, audit=None):
    """Start the real app under uvicorn in a thread; yield (base_url, state); stop it gracefully."""
    import httpx
    import uvicorn

    from homeforge.serve.app import ServerState, create_app

    torch.set_num_threads(1)
    cfg = cfg.model_copy(update={"port": free_port()})
    state = ServerState(cfg, keys=keys, audit=audit)
    app = create_app(cfg, state)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=cfg.port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{cfg.port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if state.load_error:
            raise RuntimeError(state.load_error)
        time.sleep(0.05)
    else:
        raise RuntimeError("server did not become ready")
    try:
        yield base, state
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def serve_cfg(tiny_model_dir, tmp_path):
    from homeforge.config import ServeConfig

    return ServeConfig(model_dir=str(tiny_model_dir), model_name="tiny", keys_file=str(tmp_path / "keys.json"),
                       max_batch_size=8, max_queue=64)
