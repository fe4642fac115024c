"""`homeforge serve`, `homeforge chat` and `homeforge keys` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from .conftest import free_port


def hf(*args, env=None, input=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], capture_output=True, text=True,
                          env=env, input=input, timeout=timeout)


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "HOMEFORGE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}


def cli(*args, env=None):
    """In-process run of the CLI (fast); HomeforgeError surfaces as result.exception."""
    from typer.testing import CliRunner

    from homeforge.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def test_help_has_examples():
    for cmd in (["serve"], ["chat"], ["keys", "add"], ["keys", "list"], ["keys", "revoke"]):
        r = cli(*cmd, "--help")
        assert r.exit_code == 0 and "Examples" in r.output, cmd


def test_keys_add_list_revoke(env, tmp_path):
    r = hf("keys", "add", "--name", "frontend", "--role", "user", "--rpm", "60", env=env)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("hfk_")
    store = tmp_path / "home" / "api_keys.json"
    assert token not in store.read_text()
    r = cli("keys", "list", "--keys-file", store)
    assert "frontend" in r.output and "user" in r.output and token not in r.output
    r = cli("keys", "add", "--name", "x", "--role", "root", "--keys-file", store)
    assert "unknown role" in str(r.exception)
    assert cli("keys", "revoke", "frontend", "--keys-file", store).exit_code == 0
    assert "frontend" not in cli("keys", "list", "--keys-file", store).output
    assert "frontend" in cli("keys", "list", "--all", "--keys-file", store).output
    r = hf("keys", "revoke", "frontend", env=env)  # a user error: exit 2, plain words, no traceback
    assert r.returncode == 2 and "no active key" in r.stderr and "Traceback" not in r.stderr


def test_serve_refuses_bad_setups(tmp_path, tiny_model_dir):
    keys = tmp_path / "keys.json"
    r = cli("serve", tiny_model_dir, "--host", "0.0.0.0", "--keys-file", keys)
    assert "refusing to listen on 0.0.0.0" in str(r.exception) and "keys add" in str(r.exception)
    r = cli("serve", "/nonexistent/model", "--keys-file", keys)
    assert "does not exist" in str(r.exception)
    r = cli("serve", tiny_model_dir, "max_batch_size=0", "--keys-file", keys)
    assert "max_batch_size" in str(r.exception)
    r = cli("chat")
    assert "MODEL_DIR or --url" in str(r.exception)


def test_serve_process_sigterm_finishes_in_flight(env, tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "homeforge", "serve", str(tiny_model_dir), "--port", str(port),
                             "threads=1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(base + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        out = {}

        def call():
            out["r"] = httpx.post(base + "/v1/completions", json={"prompt": "def", "max_tokens": 200,
                                                                  "temperature": 0, "ignore_eos": True}, timeout=60)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] == 200
        assert proc.wait(60) == 0  # a service stopped by SIGTERM ends normally (not killed by the signal)
        audit = env["HOMEFORGE_HOME"] + "/audit/serve.jsonl"
        lines = [json.loads(x) for x in open(audit)]
        assert any(x["route"] == "/v1/completions" and x["status"] == 200 and x["completion_tokens"] == 200
                   for x in lines)
        # and the command's own audit line is written (it was lost when the signal killed the process)
        commands = [json.loads(x) for x in open(env["HOMEFORGE_HOME"] + "/audit/audit.jsonl")]
        serve = [x for x in commands if x.get("event") == "command" and x.get("command") == "serve"]
        assert len(serve) == 1 and serve[0]["outcome"] == "ok" and serve[0]["stopped_by"] == "SIGTERM", serve
    finally:
        if proc.poll() is None:
            proc.kill()


def test_chat_local_streams_answers(env, tiny_model_dir):
    from typer.testing import CliRunner

    from homeforge.cli import app

    r = CliRunner().invoke(app, ["chat", str(tiny_model_dir), "--temperature", "0", "--max-tokens", "5"],
                           input="hello\n/reset\nwhat is a module?\n/exit\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("model>") == 2 and "conversation cleared" in r.output


def test_chat_against_a_running_server(serve_cfg):
    from homeforge.serve.chat import LocalChat, RemoteChat

    from .conftest import running_server

    msgs = [{"role": "user", "content": "hello"}]
    local = LocalChat(serve_cfg.model_dir)
    try:
        want = "".join(local.stream(msgs, 6, 0.0, 1.0, None))
    finally:
        local.close()
    with running_server(serve_cfg) as (base, _):
        remote = RemoteChat(base, None, None)
        try:
            assert remote.model == "tiny"
            assert "".join(remote.stream(msgs, 6, 0.0, 1.0, None)) == want
        finally:
            remote.close()
