"""The upstream servers behind the gateway: their addresses and keys, health, and the choice of one.

An upstream is checked with ``GET /v1/models`` (every OpenAI-compatible server has it; it
needs the upstream's key and lists the models it serves): healthy = 200 with at least one
model. Once healthy, the checks use ``GET /health`` (vLLM, llama-server, TGI and homeforge
have it; cheap, and not an audited request on a homeforge upstream), with the model list
read again every ``MODELS_EVERY`` seconds and whenever ``/health`` is missing. A healthy upstream is checked every ``health_interval`` seconds; an unhealthy one
after 0.5 s, then 1, 2, 4 ... up to ``max_backoff``. A request that fails to reach an
upstream marks it unhealthy at once and wakes its checker; it rejoins the pool when a check
passes. ``pick`` chooses the least busy healthy upstream (fewest requests in flight),
rotating among equals.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from homeforge.config import GatewayConfig, UpstreamConfig
from homeforge.errors import HomeforgeError

MODELS_EVERY = 60.0
ALLOW_FIX = ("allow it explicitly: HOMEFORGE_ALLOW_HOSTS={host} (comma-separated hosts or networks, e.g. "
             "10.0.0.5,10.0.0.0/24; see docs/serving.md, 'Gateway')")


@dataclass(eq=False)
class Upstream:
    url: str  # base URL: scheme://host:port[/prefix], without a trailing /v1
    key: str | None = field(default=None, repr=False)  # bearer key; never logged or shown
    model: str | None = None  # the upstream model id to request (None: the first it lists)
    managed: object | None = field(default=None, repr=False)  # a ManagedProcess this gateway started
    healthy: bool = False
    inflight: int = 0
    cards: list[dict] = field(default_factory=list)  # the models its last check listed
    error: str | None = "not checked yet"
    failures: int = 0  # consecutive failed checks
    since: float = field(default_factory=time.monotonic)
    listed: float = 0.0  # when /v1/models was last read
    has_health: bool | None = None  # whether it answers GET /health (None: not known yet)
    client: object | None = field(default=None, repr=False)
    wake: asyncio.Event | None = field(default=None, repr=False)

    @property
    def model_ids(self) -> list[str]:
        return [c["id"] for c in self.cards if isinstance(c, dict) and isinstance(c.get("id"), str)]

    @property
    def target_model(self) -> str | None:
        ids = self.model_ids
        return self.model or (ids[0] if ids else None)

    def serves(self, name: str | None) -> bool:
        return name is None or name in self.model_ids or name == self.model


def read_key(key_file: str | None, key_env: str | None, what: str) -> str | None:
    """The bearer key from a file or an environment variable (one line, stripped); None when neither is set."""
    if key_file and key_env:
        raise HomeforgeError(f"{what}: give key_file or key_env, not both", fix="keep one of them")
    if key_env:
        value = (os.environ.get(key_env) or "").strip()
        if not value:
            raise HomeforgeError(f"{what}: the environment variable {key_env} that should hold its key is not set",
                                 fix=f"export {key_env}=KEY, or use a key file (key_file / --upstream-key-file)")
    elif key_file:
        path = Path(key_file).expanduser()
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise HomeforgeError(f"{what}: cannot read its key file: {exc.strerror or exc}", where=str(path),
                                 fix="check the path and its permissions (the file holds the key on one line)") from None
        if not value:
            raise HomeforgeError(f"{what}: the key file is empty", where=str(path), fix="write the key on one line")
    else:
        return None
    if any(c in value for c in "\r\n\0") or not value.isprintable():
        raise HomeforgeError(f"{what}: the key must be one line of printable characters",
                             where=key_file or f"${key_env}", fix="write only the key, without quotes or newlines")
    return value


def make_upstream(u: UpstreamConfig, gw: GatewayConfig) -> Upstream:
    """Check an upstream's URL (scheme, no credentials inside, a host the offline guard allows) and read its key."""
    from homeforge.security import egress
    from homeforge.serve.net import is_loopback, normalize_host

    raw = u.url.strip()
    parts = urlsplit(raw)
    fix = "write it as http://HOST:PORT, e.g. http://127.0.0.1:8001"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HomeforgeError(f"the upstream {raw!r} is not an http(s) URL", fix=fix)
    if parts.username or parts.password:
        raise HomeforgeError(f"the upstream {parts.hostname} has credentials inside its URL",
                             fix="remove them from the URL and give the key with key_file or key_env "
                                 "(--upstream-key-file / --upstream-key-env): they would end up in logs")
    if parts.query or parts.fragment:
        raise HomeforgeError(f"the upstream {raw!r} has a query or fragment", fix=fix)
    try:
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise HomeforgeError(f"the upstream {raw!r} has an invalid port", fix=fix) from None
    host = normalize_host(parts.hostname)
    if not (is_loopback(host) or egress.allows(host)):
        raise HomeforgeError(
            f"the upstream {raw} is not on this machine, and homeforge connects only to loopback unless a host "
            "is allowed", fix=ALLOW_FIX.format(host=host) + f", e.g. HOMEFORGE_ALLOW_HOSTS={host} homeforge serve "
            f"--upstream {raw}")
    base = raw.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    key = read_key(u.key_file or (None if u.key_env else gw.key_file), u.key_env or (None if u.key_file else gw.key_env),
                   f"the upstream {base}")
    return Upstream(base.rstrip("/"), key=key, model=u.model)


class Pool:
    """The upstreams, their checkers and the choice of one; metrics per upstream in ``registry``."""

    def __init__(self, upstreams: list[Upstream], gw: GatewayConfig, registry, on_change: Callable[[], None],
                 notify: Callable[[str], None] | None = None):
        from prometheus_client import Counter, Gauge

        self.ups, self.gw, self.on_change = upstreams, gw, on_change
        self.notify = notify or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._turn = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self.healthy_gauge = Gauge("homeforge_upstream_healthy", "1 when the upstream passes its health check",
                                   ["upstream"], registry=registry)
        self.inflight_gauge = Gauge("homeforge_upstream_inflight", "requests in flight to the upstream",
                                    ["upstream"], registry=registry)
        self.outcomes = Counter("homeforge_upstream_requests_total", "requests sent to an upstream, by outcome "
                                "(ok, retried: failed before anything reached the client and went to another "
                                "upstream, broken: failed mid-stream, refused: the upstream answered 4xx)",
                                ["upstream", "outcome"], registry=registry)
        for up in upstreams:
            self.healthy_gauge.labels(up.url).set_function(lambda up=up: float(up.healthy))
            self.inflight_gauge.labels(up.url).set_function(lambda up=up: float(up.inflight))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        import httpx

        timeout = httpx.Timeout(connect=self.gw.connect_timeout, read=self.gw.read_timeout, write=60.0, pool=None)
        for up in self.ups:
            headers = {"Authorization": f"Bearer {up.key}"} if up.key else {}
            # trust_env=False: no proxy from the environment; the offline guard sees the real destination
            up.client = httpx.AsyncClient(base_url=up.url, headers=headers, timeout=timeout, trust_env=False,
                                          limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
            up.wake = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._watch(up), name=f"homeforge-health-{up.url}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks = []
        for up in self.ups:
            if up.client is not None:
                await up.client.aclose()

    # ------------------------------------------------------------------ choice

    def healthy(self, model: str | None = None) -> list[Upstream]:
        return [u for u in self.ups if u.healthy and u.serves(model)]

    def pick(self, model: str | None, exclude: set) -> Upstream | None:
        """The least busy healthy upstream serving ``model`` not in ``exclude``; ties rotate."""
        ups = [u for u in self.healthy(model) if u not in exclude]
        if not ups:
            return None
        low = min(u.inflight for u in ups)
        ties = [u for u in ups if u.inflight == low]
        return ties[next(self._turn) % len(ties)]

    @contextlib.contextmanager
    def using(self, up: Upstream):
        up.inflight += 1
        try:
            yield up
        finally:
            up.inflight -= 1

    def failed(self, up: Upstream, why: str) -> None:
        """A request could not reach ``up``: out of the pool until a check passes."""
        if up.managed is not None and up.managed.exited() is not None:
            why = up.managed.exit_message()
        if up.healthy:
            self._set(up, False, why)
        if up.wake is not None:
            up.wake.set()

    # ------------------------------------------------------------------ checks

    def _set(self, up: Upstream, healthy: bool, error: str | None) -> None:
        was = up.healthy
        up.healthy, up.error = healthy, error
        if was != healthy:
            up.since = time.monotonic()
            if healthy:
                self.notify(f"upstream {up.url} is healthy (serves {', '.join(up.model_ids)})")
            else:
                self.notify(f"upstream {up.url} left the pool: {error}")
        self.on_change()

    async def check(self, up: Upstream) -> None:
        import httpx

        managed = up.managed
        if managed is not None and managed.exited() is not None:
            self._set(up, False, managed.exit_message())
            return
        try:
            timeout = min(10.0, self.gw.read_timeout)
            if up.healthy and up.has_health is not False and time.monotonic() - up.listed < MODELS_EVERY:
                r = await up.client.get("/health", timeout=timeout)
                if r.status_code == 200:
                    up.has_health, up.failures = True, 0
                    return
                if r.status_code != 404:
                    raise _Unhealthy(f"GET /health answered {r.status_code}" + _reason(r))
                up.has_health = False
            r = await up.client.get("/v1/models", timeout=timeout)
            if r.status_code != 200:
                raise _Unhealthy(f"GET /v1/models answered {r.status_code}" + _reason(r))
            cards = r.json().get("data")
            if not isinstance(cards, list) or not any(isinstance(c, dict) and c.get("id") for c in cards):
                raise _Unhealthy("it lists no model yet (still loading?)")
        except (httpx.HTTPError, ValueError, AttributeError, _Unhealthy) as exc:
            up.failures += 1
            why = str(exc) if isinstance(exc, _Unhealthy) else f"{type(exc).__name__}: {exc}".rstrip(": ")
            if managed is not None and not up.healthy and time.monotonic() - up.since > self.gw.ready_timeout:
                why = f"not healthy after {self.gw.ready_timeout:.0f} s ({why}); see {managed.log_path}"
            self._set(up, False, why)
            return
        up.failures, up.cards, up.listed = 0, cards, time.monotonic()
        self._set(up, True, None)

    def _delay(self, up: Upstream) -> float:
        if up.healthy:
            return self.gw.health_interval
        return min(self.gw.max_backoff, 0.5 * 2 ** max(0, min(up.failures - 1, 16)))

    async def _watch(self, up: Upstream) -> None:
        while True:
            up.wake.clear()
            await self.check(up)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(up.wake.wait(), self._delay(up))
                await asyncio.sleep(0.05)  # a burst of failed requests wakes it once

    def summary(self) -> str:
        """Why no upstream can serve (for /ready and 503s)."""
        down = [f"upstream {i + 1}: {u.error}" for i, u in enumerate(self.ups) if not u.healthy]
        return f"no upstream is healthy ({len(self.ups)} configured): " + "; ".join(down)


class _Unhealthy(Exception):
    pass


def _reason(r) -> str:
    try:
        msg = r.json()["error"]["message"]
    except Exception:
        msg = r.text[:120]
    return f": {msg}" if msg else ""
