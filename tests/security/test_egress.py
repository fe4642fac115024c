"""Egress guard: non-loopback refused before connect (no packet leaves), loopback allowed, refusals audited."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from homeforge.errors import EgressError
from homeforge.security import audit, egress

TEST_NET = "192.0.2.1"  # RFC 5737 documentation address: never routed


@pytest.fixture
def spy_connect(monkeypatch):
    """Replace the real connect *under* the guard: records every call that got through the guard."""
    calls = []
    real = egress._state["orig"]["connect"]

    def recording(self, address):
        calls.append(address)
        if address[0] not in ("127.0.0.1", "::1"):
            raise ConnectionRefusedError("test spy: not sent")  # never let a packet leave the machine
        return real(self, address)

    monkeypatch.setitem(egress._state["orig"], "connect", recording)
    return calls


def test_non_loopback_refused_before_connect(spy_connect):
    assert egress.is_installed()
    for family, addr in ((socket.AF_INET, (TEST_NET, 443)), (socket.AF_INET6, ("2001:db8::1", 443, 0, 0)),
                         (socket.AF_INET6, ("::ffff:192.0.2.1", 80, 0, 0))):
        with socket.socket(family, socket.SOCK_STREAM) as s, pytest.raises(EgressError, match="refused"):
            s.connect(addr)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(EgressError):
            s.connect_ex((TEST_NET, 80))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(EgressError):
            s.sendto(b"x", (TEST_NET, 53))
        with pytest.raises(EgressError):
            s.sendmsg([b"x"], [], 0, (TEST_NET, 53))
    with pytest.raises(EgressError, match="name lookup"):
        socket.getaddrinfo("huggingface.co", 443)
    with pytest.raises(EgressError):
        socket.create_connection(("example.com", 80), timeout=1)
    assert spy_connect == []  # the real connect was never reached


def test_loopback_allowed(spy_connect):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            conn, _ = server.accept()
            c.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.close()
        with socket.create_connection(("localhost", port), timeout=5):
            server.accept()[0].close()
    assert len(spy_connect) >= 2


def test_allowed_host(monkeypatch, spy_connect):
    monkeypatch.setitem(egress._state, "allow", {"192.0.2.0/24"})
    with socket.socket() as s, pytest.raises(ConnectionRefusedError, match="test spy"):
        s.connect((TEST_NET, 9))  # allowed: passes the guard and reaches the spy (which sends nothing)
    assert spy_connect == [(TEST_NET, 9)]
    assert egress.allowed_hosts() == ["192.0.2.0/24"]


def test_refusal_is_audited_in_process(tmp_path, monkeypatch):
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("HOMEFORGE_AUDIT_LOG", str(log))
    monkeypatch.setitem(egress._state, "on_refuse", audit.egress_refused)
    with socket.socket() as s, pytest.raises(EgressError):
        s.connect((TEST_NET, 8080))
    (entry,) = list(audit.read_entries(log))
    assert entry["event"] == "egress-refused" and entry["host"] == TEST_NET and entry["port"] == 8080


def test_command_reaching_out_fails_and_is_audited(tmp_path):
    """A real `homeforge` process whose command tries to open a non-loopback connection."""
    log = tmp_path / "audit.jsonl"
    marker = tmp_path / "connect-called"
    script = textwrap.dedent(f"""
        import socket, sys
        from homeforge import cli
        from homeforge.security import egress

        @cli.app.command("phone-home")
        def phone_home() -> None:
            '''A command that tries to reach the internet (test only).'''
            # proof that nothing leaves: the real connect under the guard writes a marker
            real = egress._state["orig"]["connect"]
            def spy(self, address):
                open({str(marker)!r}, "w").write(repr(address))
                return real(self, address)
            egress._state["orig"]["connect"] = spy
            with socket.socket() as s:
                s.connect(({TEST_NET!r}, 443))

        sys.argv = ["homeforge", "phone-home"]
        cli.main()
    """)
    env = {**os.environ, "HOMEFORGE_AUDIT_LOG": str(log), "HOMEFORGE_HOME": str(tmp_path / "home")}
    env.pop("HOMEFORGE_ALLOW_NETWORK", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refused an outbound connection" in proc.stderr and TEST_NET in proc.stderr
    assert not marker.exists()
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["egress-refused", "command"]
    assert entries[0]["host"] == TEST_NET and entries[0]["port"] == 443
    assert entries[1]["command"] == "phone-home" and entries[1]["outcome"] == "error" and entries[1]["exit_code"] == 2
    assert audit.verify(log, key=None).ok
