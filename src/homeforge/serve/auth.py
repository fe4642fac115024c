"""API keys, roles and per-key rate limits for `homeforge serve`.

A key is ``hfk_<id>_<secret>`` with 256 random bits of secret. Only the SHA-256 of the
whole token is stored (a random 256-bit token needs no slow hash: there is nothing to
guess), in a JSON file written atomically with mode 0600. The token is shown once, when
it is created. The server re-reads the file when it changes, so a revoked key stops
working without a restart.

Roles: ``admin`` (everything, including model reload), ``user`` (inference),
``metrics`` (only /metrics).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from homeforge.errors import HomeforgeError

ROLES = ("admin", "user", "metrics")
PREFIX = "hfk_"


def default_keys_file() -> Path:
    from homeforge import paths

    return paths.api_keys_file()


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class ApiKey:
    id: str
    name: str
    role: str
    sha256: str
    created: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    revoked: str | None = None

    def public(self) -> dict:
        d = asdict(self)
        d.pop("sha256")
        return d


@dataclass
class KeyStore:
    path: Path
    keys: dict[str, ApiKey] = field(default_factory=dict)
    _mtime: float | None = None

    @classmethod
    def open(cls, path: str | Path | None = None) -> KeyStore:
        store = cls(Path(path) if path else default_keys_file())
        store.reload()
        return store

    def reload(self) -> None:
        if not self.path.exists():
            self.keys, self._mtime = {}, None
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.keys = {k["id"]: ApiKey(**k) for k in data.get("keys", [])}
        except (ValueError, TypeError, KeyError) as exc:
            raise HomeforgeError(f"the API key file is not valid: {exc}", where=str(self.path),
                                 fix="restore it from a backup, or move it away and create new keys") from None
        self._mtime = self.path.stat().st_mtime_ns

    def reload_if_changed(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            self.reload()

    def active(self) -> list[ApiKey]:
        return [k for k in self.keys.values() if not k.revoked]

    def _save(self) -> None:
        from homeforge._fs import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": 1, "keys": [asdict(k) for k in self.keys.values()]}, indent=2)
        atomic_write_text(self.path, text)
        os.chmod(self.path, 0o600)
        self._mtime = self.path.stat().st_mtime_ns

    def add(self, name: str, role: str, requests_per_minute: int | None = None,
            tokens_per_minute: int | None = None) -> tuple[ApiKey, str]:
        """Create a key; returns it and the token (shown once, never stored)."""
        if role not in ROLES:
            raise HomeforgeError(f"unknown role {role!r}", fix=f"choose one of: {', '.join(ROLES)}")
        for limit in (requests_per_minute, tokens_per_minute):
            if limit is not None and limit < 1:
                raise HomeforgeError(f"rate limits must be at least 1 (given {limit})",
                                     fix="leave the limit out for no limit")
        if any(k.name == name and not k.revoked for k in self.keys.values()):
            raise HomeforgeError(f"an active key named {name!r} already exists", where=str(self.path),
                                 fix="choose another --name, or revoke the old key first")
        kid = secrets.token_hex(4)
        while kid in self.keys:
            kid = secrets.token_hex(4)
        token = f"{PREFIX}{kid}_{secrets.token_urlsafe(32)}"
        key = ApiKey(kid, name, role, _hash(token), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     requests_per_minute, tokens_per_minute)
        self.keys[kid] = key
        self._save()
        return key, token

    def revoke(self, id_or_name: str) -> ApiKey:
        matches = [k for k in self.keys.values() if (k.id == id_or_name or k.name == id_or_name) and not k.revoked]
        if not matches:
            raise HomeforgeError(f"no active key with id or name {id_or_name!r}", where=str(self.path),
                                 fix="see `homeforge keys list`")
        if len(matches) > 1:
            raise HomeforgeError(f"{id_or_name!r} matches {len(matches)} keys", fix="revoke by id instead")
        key = matches[0]
        key.revoked = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._save()
        return key

    def verify(self, token: str) -> ApiKey | None:
        """The active key for ``token``, or None. Constant-time comparison of the hash."""
        if not token.startswith(PREFIX):
            return None
        kid = token[len(PREFIX):].split("_", 1)[0]
        key = self.keys.get(kid)
        if key is None or key.revoked:
            return None
        return key if hmac.compare_digest(key.sha256, _hash(token)) else None


class RateLimiter:
    """Sliding one-minute windows of requests and tokens, per key id."""

    def __init__(self, window: float = 60.0):
        self.window = window
        self._events: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def _trim(self, q: collections.deque, now: float) -> None:
        while q and q[0][0] <= now - self.window:
            q.popleft()

    def check(self, key: ApiKey, now: float | None = None) -> str | None:
        """Record one request; returns a reason string when a limit is exceeded."""
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._events[key.id]
            self._trim(q, now)
            if key.requests_per_minute is not None and sum(1 for e in q if e[1] == 0) >= key.requests_per_minute:
                return f"rate limit of {key.requests_per_minute} requests per minute reached for key {key.id}"
            if key.tokens_per_minute is not None and sum(e[1] for e in q) >= key.tokens_per_minute:
                return f"rate limit of {key.tokens_per_minute} tokens per minute reached for key {key.id}"
            q.append((now, 0))
            return None

    def add_tokens(self, key_id: str, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events[key_id].append((now, tokens))

    def retry_after(self, key_id: str) -> int:
        with self._lock:
            q = self._events.get(key_id)
            if not q:
                return 1
            return max(1, int(q[0][0] + self.window - time.monotonic()) + 1)
