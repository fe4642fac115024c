"""Offline guarantee: library hub/telemetry switches off, and an egress guard every socket passes.

``install()`` adds a Python audit hook (``sys.addaudithook``, PEP 578) on the events the
interpreter raises inside the socket module itself, before the system call:
``socket.connect`` (also ``connect_ex`` and every asyncio/httpx/urllib connection),
``socket.sendto``, ``socket.sendmsg``, ``socket.getaddrinfo``, ``socket.gethostbyname(_ex)``
and ``socket.gethostbyaddr``. An address other than loopback (or one the user allowed) raises
``EgressError`` there, so no packet (not even a DNS query) leaves. Because the events come from
the C socket module, ``_socket.socket(...).connect(...)``, ``socket.SocketType`` and sockets
made by any library are covered; patching ``socket.socket`` methods (the previous design) left
those side doors open. An audit hook cannot be removed: ``uninstall()`` switches it off.

Child processes: ``install`` sets ``HOMEFORGE_EGRESS_GUARD=1`` for them, and importing
homeforge with it set installs the guard, so Python children that import homeforge (torchrun
ranks, multiprocessing workers, ``python -m homeforge``) are guarded. Other programs (a
compiler, llama.cpp, curl, a Python process that never imports homeforge) and native code that
opens sockets without Python's socket module are not: use a network namespace or a firewall
for a kernel-level boundary (``homeforge doctor`` says so).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Callable, Iterable

from homeforge import paths
from homeforge.errors import EgressError

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "DO_NOT_TRACK": "1",
    "DISABLE_TELEMETRY": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

_state: dict = {"installed": False, "active": False, "allow": set(), "resolved": None, "on_refuse": None}
CHILD_ENV = "HOMEFORGE_EGRESS_GUARD"
_INET = (socket.AF_INET, socket.AF_INET6)


def set_offline_env() -> None:
    """Turn every known hub/telemetry switch off (before those libraries are imported)."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value


def _allowed_host(host: str, allow: set[str] | None = None) -> bool:
    allow = _state["allow"] if allow is None else allow
    if host in allow or host in ("localhost", "localhost.localdomain", "", "ip6-localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # a name to be resolved: refuse unless allowed (resolving may send DNS packets)
    if ip.is_loopback or ip.is_unspecified:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback:
        return True
    return any(_in_allowed(ip, a) for a in allow) or str(ip) in _resolved_allowed_names()


def _resolved_allowed_names() -> set[str]:
    """The addresses the allowed host *names* resolve to (looked up once; a lookup of an allowed
    name passes the guard), so a connection to an allowed name's address is allowed too."""
    if _state["resolved"] is None:
        _state["resolved"] = set()
        for name in list(_state["allow"]):
            try:
                ipaddress.ip_network(name, strict=False)
                continue  # an address or a network, not a name
            except ValueError:
                pass
            try:
                _state["resolved"] |= {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
            except OSError:
                continue
    return _state["resolved"]


def _in_allowed(ip, allowed: str) -> bool:
    try:
        return ip in ipaddress.ip_network(allowed, strict=False)
    except ValueError:
        return False


def _refuse(host: str, port, what: str) -> None:
    callback = _state["on_refuse"]
    if callback is not None:
        try:
            callback(host, port, what)
        except Exception:
            pass
    raise EgressError(
        f"homeforge refused an outbound connection to {host}:{port} ({what}); it works offline",
        fix="nothing should need the network; to allow a host explicitly set HOMEFORGE_ALLOW_HOSTS=HOST[,HOST]",
    )


def _check_address(address, what: str) -> None:
    if isinstance(address, tuple) and address:
        host = str(address[0])
        port = address[1] if len(address) > 1 else None
        if not _allowed_host(host):
            _refuse(host, port, what)


def _hook(event: str, args: tuple) -> None:
    """The audit hook: called by the interpreter for every audit event, so it returns at once for others."""
    if not event.startswith("socket.") or not _state["active"]:
        return
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock, address = args[0], args[1]
        if getattr(sock, "family", None) in _INET and address is not None:
            _check_address(address, event.split(".", 1)[1])
    elif event == "socket.getaddrinfo":
        host = args[0]
        h = host.decode() if isinstance(host, (bytes, bytearray)) else (host or "")
        if not _allowed_host(str(h)):
            _refuse(str(h), args[1], "name lookup")
    elif event in ("socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        h = str(args[0] or "")
        if not _allowed_host(h):
            _refuse(h, None, "name lookup")


def install(allow: Iterable[str] = (), on_refuse: Callable[[str, object, str], None] | None = None) -> None:
    """Install the guard in this process (idempotent) and for the Python children that import homeforge.
    Unix sockets are unaffected."""
    _state["allow"] |= set(allow) | paths.allowed_hosts()
    _state["resolved"] = None  # looked up again for the new allow list
    if on_refuse is not None:
        _state["on_refuse"] = on_refuse
    os.environ[CHILD_ENV] = "1"
    _state["active"] = True
    if not _state["installed"]:
        sys.addaudithook(_hook)
        _state["installed"] = True


def uninstall() -> None:
    """Switch the guard off (an audit hook stays registered for the life of the process, inactive)."""
    _state["active"] = False
    os.environ.pop(CHILD_ENV, None)


def is_installed() -> bool:
    return _state["active"]


def allows(host: str) -> bool:
    """Whether a connection to ``host`` passes the guard: loopback, an allowed host or network
    (``HOMEFORGE_ALLOW_HOSTS`` or ``install(allow=...)``), or ``HOMEFORGE_ALLOW_NETWORK=1``."""
    if paths.network_allowed():
        return True
    return _allowed_host(host.strip("[]"), _state["allow"] | paths.allowed_hosts())


def allowed_hosts() -> list[str]:
    """The hosts/networks allowed besides loopback (``HOMEFORGE_ALLOW_HOSTS`` or ``install(allow=...)``)."""
    return sorted(_state["allow"])


def install_if_parent_did() -> None:
    """Called when homeforge is imported: a child of a guarded homeforge process guards itself too."""
    if os.environ.get(CHILD_ENV) == "1" and not paths.network_allowed():
        install()
