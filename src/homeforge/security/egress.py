"""Offline guarantee: library hub/telemetry switches off, and a socket-level egress guard.

``install()`` wraps ``socket.socket.connect``/``connect_ex``/``sendto`` and
``socket.getaddrinfo`` so that any attempt to reach an address other than loopback (or an
address the user allowed) raises ``EgressError`` *before* a packet is sent.
"""

from __future__ import annotations

import ipaddress
import os
import socket
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

_state: dict = {"installed": False, "allow": set(), "resolved": set(), "on_refuse": None, "orig": {}}


def set_offline_env() -> None:
    """Turn every known hub/telemetry switch off (before those libraries are imported)."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value


def _allowed_host(host: str, allow: set[str] | None = None) -> bool:
    allow = _state["allow"] | _state["resolved"] if allow is None else allow
    if host in allow or host in ("localhost", "localhost.localdomain", "", "ip6-localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # a name to be resolved: refuse unless allowed (resolving may send DNS packets)
    if ip.is_loopback or ip.is_unspecified:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return any(_in_allowed(ip, a) for a in allow)


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


def install(allow: Iterable[str] = (), on_refuse: Callable[[str, object, str], None] | None = None) -> None:
    """Install the guard in this process (idempotent). Unix sockets are unaffected."""
    _state["allow"] |= set(allow) | paths.allowed_hosts()
    if on_refuse is not None:
        _state["on_refuse"] = on_refuse
    if _state["installed"]:
        return
    orig = _state["orig"]
    orig["connect"] = socket.socket.connect
    orig["connect_ex"] = socket.socket.connect_ex
    orig["sendto"] = socket.socket.sendto
    orig["sendmsg"] = socket.socket.sendmsg
    orig["getaddrinfo"] = socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check_address(address, "connect")
        return orig["connect"](self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check_address(address, "connect")
        return orig["connect_ex"](self, address)

    def sendto(self, data, *args):
        address = args[-1] if args else None
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check_address(address, "sendto")
        return orig["sendto"](self, data, *args)

    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):
        if address is not None and self.family in (socket.AF_INET, socket.AF_INET6):
            _check_address(address, "sendmsg")
        if address is None:
            return orig["sendmsg"](self, buffers, ancdata, flags)
        return orig["sendmsg"](self, buffers, ancdata, flags, address)

    def getaddrinfo(host, port, *args, **kwargs):
        h = host.decode() if isinstance(host, bytes) else (host or "")
        if not _allowed_host(str(h)):
            _refuse(str(h), port, "name lookup")
        infos = orig["getaddrinfo"](host, port, *args, **kwargs)
        if h in _state["allow"]:  # an allowed name: the addresses it resolves to are allowed too
            _state["resolved"] |= {str(info[4][0]) for info in infos}
        return infos

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.socket.sendmsg = sendmsg
    socket.getaddrinfo = getaddrinfo
    _state["installed"] = True


def uninstall() -> None:
    if not _state["installed"]:
        return
    orig = _state["orig"]
    socket.socket.connect = orig["connect"]
    socket.socket.connect_ex = orig["connect_ex"]
    socket.socket.sendto = orig["sendto"]
    socket.socket.sendmsg = orig["sendmsg"]
    socket.getaddrinfo = orig["getaddrinfo"]
    _state["installed"] = False


def is_installed() -> bool:
    return _state["installed"]


def allows(host: str) -> bool:
    """Whether a connection to ``host`` passes the guard: loopback, an allowed host or network
    (``HOMEFORGE_ALLOW_HOSTS`` or ``install(allow=...)``), or ``HOMEFORGE_ALLOW_NETWORK=1``."""
    if paths.network_allowed():
        return True
    return _allowed_host(host.strip("[]"), _state["allow"] | _state["resolved"] | paths.allowed_hosts())


def allowed_hosts() -> list[str]:
    """The hosts/networks allowed besides loopback (``HOMEFORGE_ALLOW_HOSTS`` or ``install(allow=...)``)."""
    return sorted(_state["allow"])
