"""Egress guard: non-loopback refused before connect (no packet leaves), loopback allowed, refusals audited.

The guard is an audit hook on the socket module's own events, so every way of making a socket is
covered: ``socket.socket``, ``_socket.socket``, ``socket.SocketType``, asyncio, httpx, urllib, and a
Python child process that imports homeforge. Nothing here can send a packet even if the guard
failed: every socket that aims at the documentation address 192.0.2.1 (RFC 5737) is first bound to
127.0.0.1, and the kernel refuses (EINVAL) to send a loopback-sourced packet anywhere else, so an
unguarded connect fails with ``OSError(EINVAL)``, never ``EgressError``; names are never resolved.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from homeforge.errors import EgressError
from homeforge.security import audit, audit_command, egress

TEST_NET = "192.0.2.1"  # RFC 5737 documentation address


def bound(family=socket.AF_INET, kind=socket.SOCK_STREAM, factory=socket.socket):
    """A socket whose source is loopback: if the guard let a connect through, the kernel refuses it (EINVAL)."""
    s = factory(family, kind)
    s.bind(("127.0.0.1", 0) if family == socket.AF_INET else ("::1", 0))
    return s


def not_connected(s) -> bool:
    try:
        s.getpeername()
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def test_non_loopback_refused_before_connect():
    assert egress.is_installed()
    for addr in ((TEST_NET, 443),):
        with bound() as s, pytest.raises(EgressError, match="refused"):
            s.connect(addr)
        with bound() as s:
            with pytest.raises(EgressError):
                s.connect_ex(addr)
            assert not_connected(s)
    with bound(socket.AF_INET6) as s, pytest.raises(EgressError):
        s.connect(("2001:db8::1", 443, 0, 0))
    with bound(socket.AF_INET6) as s, pytest.raises(EgressError):
        s.connect(("::ffff:192.0.2.1", 80, 0, 0))
    with bound(kind=socket.SOCK_DGRAM) as s:
        with pytest.raises(EgressError):
            s.sendto(b"x", (TEST_NET, 53))
        with pytest.raises(EgressError):
            s.sendmsg([b"x"], [], 0, (TEST_NET, 53))
    with pytest.raises(EgressError, match="name lookup"):
        socket.getaddrinfo("huggingface.co", 443)
    with pytest.raises(EgressError, match="name lookup"):
        socket.gethostbyname("huggingface.co")
    with pytest.raises(EgressError):
        socket.create_connection(("example.com", 80), timeout=1)


def test_side_doors_are_closed():
    """The C-level socket type and its aliases: the issue's `_socket.socket(...).connect(...)` and SocketType."""
    import _socket

    for factory in (_socket.socket, socket.SocketType):
        s = bound(factory=factory)
        try:
            with pytest.raises(EgressError, match="refused"):
                s.connect((TEST_NET, 443))
            assert not_connected(s)
        finally:
            s.close()
    raw = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        raw.bind(("127.0.0.1", 0))
        with pytest.raises(EgressError):
            raw.sendto(b"x", (TEST_NET, 53))
    finally:
        raw.close()
    with pytest.raises(EgressError):
        _socket.getaddrinfo("example.com", 80)


def test_asyncio_httpx_urllib_refused():
    import http.client
    import urllib.error
    import urllib.request

    import httpx

    async def connect():
        loop = asyncio.get_running_loop()
        await loop.create_connection(asyncio.Protocol, TEST_NET, 80, local_addr=("127.0.0.1", 0))

    with pytest.raises(EgressError):
        asyncio.run(connect())

    async def sock_connect():
        loop = asyncio.get_running_loop()
        with bound() as s:
            s.setblocking(False)
            await loop.sock_connect(s, (TEST_NET, 80))

    with pytest.raises(EgressError):
        asyncio.run(sock_connect())
    transport = httpx.HTTPTransport(local_address="127.0.0.1", retries=0)
    with httpx.Client(transport=transport, timeout=2) as client, pytest.raises(httpx.ConnectError) as err:
        client.get(f"http://{TEST_NET}/")
    assert "refused an outbound connection" in str(err.value)
    conn = http.client.HTTPConnection(TEST_NET, 80, timeout=2, source_address=("127.0.0.1", 0))
    with pytest.raises(EgressError):
        conn.request("GET", "/")
    with pytest.raises(urllib.error.URLError) as err:
        urllib.request.urlopen("http://huggingface.co/", timeout=2)  # refused at the name lookup
    assert isinstance(err.value.reason, EgressError)


def test_loopback_allowed():
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


def test_allowed_host_passes_the_guard(monkeypatch):
    monkeypatch.setitem(egress._state, "allow", {"192.0.2.0/24"})
    with bound() as s, pytest.raises(OSError) as err:
        s.connect((TEST_NET, 9))  # allowed: passes the guard and reaches the kernel, which refuses the loopback source
    assert not isinstance(err.value, EgressError) and err.value.errno == errno.EINVAL
    assert egress.allowed_hosts() == ["192.0.2.0/24"]


def test_refusal_is_audited_in_process(tmp_path, monkeypatch):
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("HOMEFORGE_AUDIT_LOG", str(log))
    monkeypatch.setitem(egress._state, "on_refuse", audit_command.egress_refused)
    with bound() as s, pytest.raises(EgressError):
        s.connect((TEST_NET, 8080))
    (entry,) = list(audit.read_entries(log))
    assert entry["event"] == "egress-refused" and entry["host"] == TEST_NET and entry["port"] == 8080


CHILD = textwrap.dedent(f"""
    import errno, _socket
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    IMPORT
    try:
        s.connect(({TEST_NET!r}, 443))
    except OSError as exc:
        print(type(exc).__name__, exc.errno)
""")


def test_subprocesses(tmp_path):
    """A Python child that imports homeforge inherits the guard; one that does not is not stopped by it
    (only a kernel boundary stops it: doctor says so). Neither sends a packet (loopback source)."""
    env = {**os.environ, "HOMEFORGE_HOME": str(tmp_path / "home")}
    env.pop("HOMEFORGE_ALLOW_NETWORK", None)
    assert env.get(egress.CHILD_ENV) == "1"  # set by install() for children
    guarded = subprocess.run([sys.executable, "-c", CHILD.replace("IMPORT", "import homeforge")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert guarded.stdout.split()[0] == "EgressError", guarded.stdout + guarded.stderr
    plain = subprocess.run([sys.executable, "-c", CHILD.replace("IMPORT", "")], env=env, capture_output=True, text=True,
                           timeout=120)
    assert plain.stdout.split() == ["OSError", str(errno.EINVAL)], plain.stdout + plain.stderr
    from homeforge.doctor import checks

    row = next(r for r in checks(str(tmp_path)) if r[0] == "network guard: child processes")
    assert "not" in row[1] and "unshare" in row[3]


def test_command_reaching_out_fails_and_is_audited(tmp_path):
    """A real `homeforge` process whose command tries a raw `_socket` connection."""
    log = tmp_path / "audit.jsonl"
    script = textwrap.dedent(f"""
        import sys, _socket
        from homeforge import cli

        @cli.app.command("phone-home")
        def phone_home() -> None:
            '''A command that tries to reach the internet (test only).'''
            s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            s.connect(({TEST_NET!r}, 443))

        sys.argv = ["homeforge", "phone-home"]
        cli.main()
    """)
    env = {**os.environ, "HOMEFORGE_AUDIT_LOG": str(log), "HOMEFORGE_HOME": str(tmp_path / "home")}
    env.pop("HOMEFORGE_ALLOW_NETWORK", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refused an outbound connection" in proc.stderr and TEST_NET in proc.stderr
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["egress-refused", "command"]
    assert entries[0]["host"] == TEST_NET and entries[0]["port"] == 443
    assert entries[1]["command"] == "phone-home" and entries[1]["outcome"] == "error" and entries[1]["exit_code"] == 2
    assert audit.verify(log, key=None).ok
