"""Host forms for `homeforge serve`: IPv4, IPv6 (``::``, ``::1``, ``[::1]``), hostnames.

``is_loopback`` decides whether keys are needed (a name is loopback only if every address
it resolves to is; names other than localhost are resolved only when the egress guard
allows them, HOMEFORGE_ALLOW_HOSTS); ``bind`` opens the listening socket for any of these
forms, so the server does not depend on how uvicorn guesses the address family.
"""

from __future__ import annotations

import ipaddress
import socket

from homeforge.errors import EgressError, HomeforgeError


def normalize_host(host: str | None) -> str:
    """``[::1]`` -> ``::1``; surrounding spaces removed."""
    h = (host or "").strip()
    return h[1:-1] if h.startswith("[") and h.endswith("]") else h


def _ip_is_loopback(text: str) -> bool | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone index (fe80::1%eth0)
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def is_loopback(host: str | None) -> bool:
    h = normalize_host(host)
    if not h:
        return False  # "" binds every interface
    if h == "localhost":
        return True
    literal = _ip_is_loopback(h)
    if literal is not None:
        return literal
    try:
        infos = socket.getaddrinfo(h, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, HomeforgeError):  # unknown, or a lookup the egress guard refuses
        return False
    return bool(infos) and all(_ip_is_loopback(str(info[4][0])) for info in infos)


def bind(host: str | None, port: int) -> socket.socket:
    """A bound TCP socket for ``host``:``port`` (the first address the host resolves to)."""
    h = normalize_host(host)
    try:
        infos = socket.getaddrinfo(h or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except EgressError:  # resolving a name may send DNS packets: only with the name allowed
        raise HomeforgeError(f"cannot resolve the host {host!r} offline", fix=f"pass an IP address (127.0.0.1, ::1, "
                             f"0.0.0.0, ::), or allow the name: HOMEFORGE_ALLOW_HOSTS={h}") from None
    except (OSError, UnicodeError) as exc:
        raise HomeforgeError(f"cannot resolve the host {host!r}: {getattr(exc, 'strerror', None) or exc}",
                             fix="pass an IP address (127.0.0.1, ::1, 0.0.0.0, ::) or a name the system resolves "
                                 "(/etc/hosts)") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise HomeforgeError(f"cannot listen on {url(h, port)}: {exc.strerror or exc}",
                             fix="choose another --port, stop the program that uses it, or check --host") from None
    return sock


def url(host: str | None, port: int) -> str:
    h = normalize_host(host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h or '0.0.0.0'}:{port}"
