"""Login sessions of the dashboard: API keys (serve/auth.py) in, a session cookie and a CSRF token out.

A key's role maps to a dashboard role: ``admin`` -> admin (everything, keys and roles included);
``operator`` or ``user`` -> operator (start/stop runs, promote, chat); ``viewer`` or ``metrics`` ->
viewer (read only). Sessions live in the server's memory (a restart logs everyone out), expire
after ``IDLE_S`` without a request, and end at once when their key is revoked.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

from homeforge.serve.auth import ApiKey, KeyStore

UI_ROLE = {"admin": "admin", "operator": "operator", "user": "operator", "viewer": "viewer", "metrics": "viewer"}
LEVEL = {"viewer": 0, "operator": 1, "admin": 2}
COOKIE = "homeforge_session"
IDLE_S = 8 * 3600
MAX_SESSIONS = 10_000  # held in memory; past it the idle (else the oldest) are forgotten


@dataclass
class Session:
    id: str
    role: str
    name: str
    key_id: str | None
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    last: float = field(default_factory=time.monotonic)

    def may(self, role: str) -> bool:
        return LEVEL[self.role] >= LEVEL[role]


class Sessions:
    def __init__(self, keys: KeyStore):
        self.keys = keys
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def keys_required(self) -> bool:
        self.keys.reload_if_changed()
        return bool(self.keys.active())

    def login(self, token: str) -> Session | None:
        """A new session for a valid, active key; None otherwise."""
        self.keys.reload_if_changed()
        key: ApiKey | None = self.keys.verify(token.strip())
        if key is None:
            return None
        return self._new(UI_ROLE.get(key.role, "viewer"), key.name, key.id)

    def local(self) -> Session:
        """No API keys exist (so the dashboard only listens on loopback): the local user, as admin."""
        return self._new("admin", "local", None)

    def _new(self, role: str, name: str, key_id: str | None) -> Session:
        s = Session(secrets.token_urlsafe(32), role, name, key_id)
        now = time.monotonic()
        with self._lock:
            if len(self._by_id) >= MAX_SESSIONS:  # forget idle ones first, then the oldest
                idle = [k for k, v in self._by_id.items() if now - v.last > IDLE_S]
                for k in idle or sorted(self._by_id, key=lambda k: self._by_id[k].last)[:len(self._by_id) // 10 + 1]:
                    del self._by_id[k]
            self._by_id[s.id] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            s = self._by_id.get(sid)
        if s is None:
            return None
        now = time.monotonic()
        if now - s.last > IDLE_S or not self._key_active(s):
            self.drop(sid)
            return None
        s.last = now
        return s

    def _key_active(self, s: Session) -> bool:
        if s.key_id is None:
            return not self.keys_required()  # a key created since: the local session ends
        self.keys.reload_if_changed()
        k = self.keys.keys.get(s.key_id)
        return k is not None and not k.revoked

    def drop(self, sid: str) -> None:
        with self._lock:
            self._by_id.pop(sid, None)


def csrf_ok(s: Session, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(s.csrf, given or "")
