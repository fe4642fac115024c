"""The server as a process: the command audit line on SIGINT (SIGTERM: test_cli.py), every host form."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from homeforge.errors import HomeforgeError
from homeforge.serve.auth import KeyStore


def _wait_ready(url: str, proc=None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None:
            assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become ready")


def _command_lines(home) -> list[dict]:
    lines = [json.loads(x) for x in (home / "audit" / "audit.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("event") == "command" and x.get("command") == "serve"]


def test_sigint_interrupts_serve_with_its_command_audit_line(serve_cfg, tmp_path, monkeypatch):
    """Ctrl-C: the server drains, then the command ends as interrupted (in this process, main thread)."""
    from homeforge.security.audit_command import audited_command
    from homeforge.serve.app import Runner

    home = tmp_path / "home"
    monkeypatch.setenv("HOMEFORGE_HOME", str(home))
    monkeypatch.delenv("HOMEFORGE_AUDIT_LOG", raising=False)
    cfg = serve_cfg.model_copy(update={"port": 0, "audit_file": str(tmp_path / "serve.jsonl"), "threads": 1})

    def interrupt_when_ready():
        _wait_ready(runner.url)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt), audited_command(["serve", str(cfg.model_dir)]):
        runner = Runner(cfg)
        threading.Thread(target=interrupt_when_ready, daemon=True).start()
        runner.run()
    cmd = _command_lines(home)
    assert len(cmd) == 1 and cmd[0]["outcome"] == "interrupted" and cmd[0]["stopped_by"] == "SIGINT", cmd


def test_loopback_forms():
    from homeforge.serve.net import is_loopback, normalize_host, url

    for host in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", " ::1 ", "::ffff:127.0.0.1", "localhost"):
        assert is_loopback(host), host
    for host in ("", "0.0.0.0", "::", "[::]", "10.1.2.3", "fe80::1%lo", "no-such-host.invalid"):
        assert not is_loopback(host), host
    assert normalize_host("[::1]") == "::1" and url("::", 8000) == "http://[::]:8000"
    assert url("127.0.0.1", 80) == "http://127.0.0.1:80"


@pytest.mark.parametrize("host,needs_key,reach", [
    ("::1", False, ["[::1]"]),
    ("[::1]", False, ["[::1]"]),
    ("localhost", False, ["127.0.0.1"]),
    ("::", True, ["[::1]", "127.0.0.1"]),  # every interface, IPv6 and (dual stack) IPv4
])
def test_every_host_form_serves(serve_cfg, tmp_path, host, needs_key, reach):
    from homeforge.serve.app import Runner

    cfg = serve_cfg.model_copy(update={"host": host, "port": 0, "audit_file": str(tmp_path / "serve.jsonl"),
                                       "threads": 1})
    headers = {}
    if needs_key:
        with pytest.raises(HomeforgeError, match=f"refusing to listen on {host}"):
            Runner(cfg)
        headers["Authorization"] = "Bearer " + KeyStore.open(cfg.keys_file).add("app", "user")[1]
    runner = Runner(cfg)
    port = int(runner.url.rsplit(":", 1)[1])
    assert port > 0
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        for where in reach:
            _wait_ready(f"http://{where}:{port}")
            r = httpx.post(f"http://{where}:{port}/v1/completions", json={"prompt": "def", "max_tokens": 2},
                           headers=headers, timeout=30)
            assert r.status_code == 200, (where, r.text)
    finally:
        runner.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_unresolvable_host_is_a_clear_error(monkeypatch):
    from homeforge.security import egress
    from homeforge.serve.net import bind

    with pytest.raises(HomeforgeError, match="cannot resolve the host 'db.example' offline") as err:
        bind("db.example", 0)  # the egress guard refuses the lookup: it could send DNS packets
    assert "HOMEFORGE_ALLOW_HOSTS=db.example" in err.value.render()
    monkeypatch.setitem(egress._state, "allow", {"no-such-host.invalid"})
    with pytest.raises(HomeforgeError, match="cannot resolve the host 'no-such-host.invalid': "):
        bind("no-such-host.invalid", 0)
    s = bind("127.0.0.1", 0)
    s.listen()
    try:
        with pytest.raises(HomeforgeError, match="cannot listen on"):
            bind("127.0.0.1", s.getsockname()[1])
    finally:
        s.close()


def test_cli_host_forms_reach_the_bind_check(tmp_path, tiny_model_dir):
    """`--host ::` and `--host [::]` arrive as strings and are refused without keys, naming the address."""
    from typer.testing import CliRunner

    from homeforge.cli import app

    for host in ("::", "[::]", "0.0.0.0"):
        r = CliRunner().invoke(app, ["serve", str(tiny_model_dir), "--host", host, "--keys-file",
                                     str(tmp_path / "keys.json")])
        assert f"refusing to listen on {host} without API keys" in str(r.exception), (host, r.output)
