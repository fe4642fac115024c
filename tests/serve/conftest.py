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
def running_server(cfg, keys=None, audit=None, port: int | None = None, timeout: float = 60):
    """Start the real app under uvicorn in a thread; yield (base_url, state); stop it gracefully."""
    import httpx
    import uvicorn

    from homeforge.serve.app import ServerState, create_app

    torch.set_num_threads(1)
    cfg = cfg.model_copy(update={"port": port or free_port()})
    state = ServerState(cfg, keys=keys, audit=audit)
    app = create_app(cfg, state)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=cfg.port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{cfg.port}"
    deadline = time.time() + timeout
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


@pytest.fixture(scope="session")
def tiny_classifier_dir(tiny_tokenizer, tmp_path_factory):
    """A debug-preset Llama sequence classifier (labels billing, fraud, other) saved as a model directory."""
    from transformers import LlamaForSequenceClassification

    from homeforge.models.io import save_model_dir
    from homeforge.models.presets import preset_config

    tok = tiny_tokenizer
    cfg = preset_config("debug", len(tok), pad_token_id=tok.pad_token_id,
                        overrides={"num_labels": 3, "id2label": {0: "billing", 1: "fraud", 2: "other"},
                                   "label2id": {"billing": 0, "fraud": 1, "other": 2}})
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    out = tmp_path_factory.mktemp("clf") / "clf"
    save_model_dir(model, tok, out)
    return out


# --------------------------------------------------------------------------- real server processes


class ServeProcess:
    """`python -m homeforge serve ARGS` as a real process on a free loopback port (its own HOMEFORGE_HOME)."""

    def __init__(self, args, home, env: dict | None = None, port: int | None = None):
        import os

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        self.home, self.log_path = home, home / f"serve-{self.port}.log"
        self.env = {**os.environ, "HOMEFORGE_HOME": str(home), "OMP_NUM_THREADS": "1", **(env or {})}
        self.args = [str(a) for a in args]
        self.proc = None

    def start(self) -> ServeProcess:
        import subprocess
        import sys

        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "homeforge", "serve", *self.args, "--port", str(self.port)],
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 180) -> ServeProcess:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.url} did not become ready: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()


@contextmanager
def running_gateway(cfg, keys=None, audit=None, healthy: int | None = None, timeout: float = 60):
    """The gateway app under uvicorn in a thread (as ``running_server``), once ``healthy`` upstreams passed a check."""
    with running_server(cfg, keys=keys, audit=audit, timeout=timeout) as (base, state):
        want = len(state.driver.pool.ups) if healthy is None else healthy
        deadline = time.time() + timeout
        while len(state.driver.pool.healthy()) < want:
            if time.time() > deadline:
                raise RuntimeError(f"upstreams not healthy: {state.driver.pool.summary()}")
            time.sleep(0.05)
        yield base, state


class Upstream:
    def __init__(self, url: str, state):
        self.url, self.state = url, state


@pytest.fixture(scope="session")
def upstreams(tiny_model_dir, tmp_path_factory):
    """Two real homeforge servers of the tiny model on loopback (uvicorn in threads of this process, so
    they start in a second): A open (no keys), B requiring a key. The failover test kills a process of
    its own instead.

    Yields (a, b, b_key_file, b_metrics_key): b's key for the gateway (the upstream-auth path) is in
    b_key_file; b_metrics_key reads b's /metrics. B decodes at most 2 sequences at a time.
    """
    from homeforge.config import ServeConfig
    from homeforge.serve.auth import KeyStore

    root = tmp_path_factory.mktemp("upstreams")
    store = KeyStore.open(root / "b-keys.json")
    token = store.add("gateway", "user")[1]
    key_file = root / "b.key"
    key_file.write_text(token + "\n")
    b_metrics = store.add("scraper", "metrics")[1]
    base = dict(model_dir=str(tiny_model_dir), max_queue=64)
    with running_server(ServeConfig(**base, keys_file=str(root / "a-keys.json"), max_batch_size=4)) as (ua, sa), \
            running_server(ServeConfig(**base, keys_file=str(root / "b-keys.json"), max_batch_size=2),
                           keys=store) as (ub, sb):
        yield Upstream(ua, sa), Upstream(ub, sb), key_file, b_metrics
