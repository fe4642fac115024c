"""API keys, roles and per-key rate limits for `homeforge serve`.

A key is ``hfk_<id>_<secret>`` with 256 random bits of secret. Only the SHA-256 of the
whole token is stored (a random 256-bit token needs no slow hash: there is nothing to
guess), in a JSON file written atomically with mode 0600. The token is shown once, when
it is created. The server re-reads the file when it changes, so a revoked key stops
working without a restart.

Roles: ``admin`` (everything, including model reload), ``user`` (inference),
``metrics`` (only /metrics); for the dashboard (`homeforge ui`, ui/sessions.py) also ``operator``
(inference here; runs, promotions and the playground there) and ``viewer`` (read-only pages there,
nothing but the OpenAPI document here).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import itertools
import json
import math
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from homeforge.errors import HomeforgeError

ROLES = ("admin", "user", "metrics", "operator", "viewer")
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
    """Sliding one-minute windows of requests and tokens per key, plus tokens reserved in flight.

    A generation reserves what it may cost (prompt + max_tokens per choice) before it runs
    and settles to what it really used when it ends, however it ends, so neither concurrent
    streams nor streams closed early get past a tokens-per-minute limit.
    """

    def __init__(self, window: float = 60.0):
        self.window = window
        self._requests: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._tokens: dict[str, collections.deque] = collections.defaultdict(collections.deque)  # (time, n)
        self._inflight: dict[str, dict[int, int]] = collections.defaultdict(dict)  # ticket -> tokens
        self._tickets = itertools.count(1)
        self._lock = threading.Lock()

    def _trim(self, key_id: str, now: float) -> None:
        for q in (self._requests[key_id], self._tokens[key_id]):
            while q and q[0][0] <= now - self.window:
                q.popleft()

    def _used(self, key_id: str) -> int:
        return sum(n for _, n in self._tokens[key_id]) + sum(self._inflight[key_id].values())

    def check(self, key: ApiKey, now: float | None = None) -> str | None:
        """Record one request; returns a reason string when a limit is already reached."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(key.id, now)
            if key.requests_per_minute is not None and len(self._requests[key.id]) >= key.requests_per_minute:
                return f"rate limit of {key.requests_per_minute} requests per minute reached for key {key.id}"
            if key.tokens_per_minute is not None and self._used(key.id) >= key.tokens_per_minute:
                return f"rate limit of {key.tokens_per_minute} tokens per minute reached for key {key.id}"
            self._requests[key.id].append((now, 1))
            return None

    def reserve(self, key: ApiKey, tokens: int, now: float | None = None) -> tuple[int | None, str | None]:
        """(ticket, None) when ``tokens`` fit the key's budget now (held until ``settle``), else (None, reason)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(key.id, now)
            limit = key.tokens_per_minute
            if limit is not None and self._used(key.id) + tokens > limit:
                return None, (f"rate limit of {limit} tokens per minute reached for key {key.id} (this request "
                              f"may use up to {tokens} tokens)")
            ticket = next(self._tickets)
            self._inflight[key.id][ticket] = tokens
            return ticket, None

    def settle(self, key_id: str, ticket: int | None, tokens: int, now: float | None = None) -> None:
        """Replace a reservation by the tokens really used (counted from now for one window)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if ticket is not None:
                self._inflight[key_id].pop(ticket, None)
            if tokens:
                self._tokens[key_id].append((now, tokens))

    def add_tokens(self, key_id: str, tokens: int, now: float | None = None) -> None:
        self.settle(key_id, None, tokens, now)

    def retry_after(self, key: ApiKey, tokens: int = 1, now: float | None = None) -> int:
        """Whole seconds until one more request needing ``tokens`` fits both of the key's limits (>= 1).

        Counted to the moment enough old requests/tokens leave the window, not to the oldest
        event. When tokens reserved by requests still in flight alone block it, one window.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(key.id, now)
            wait = 0.0
            reqs = self._requests[key.id]
            rpm = key.requests_per_minute
            if rpm is not None and len(reqs) >= rpm:
                wait = reqs[len(reqs) - rpm][0] + self.window - now
            tpm = key.tokens_per_minute
            excess = self._used(key.id) + tokens - tpm if tpm is not None else 0
            if excess > 0:
                freed = 0
                for t, n in self._tokens[key.id]:
                    freed += n
                    if freed >= excess:
                        wait = max(wait, t + self.window - now)
                        break
                else:
                    wait = max(wait, self.window)
            return max(1, math.ceil(wait))
