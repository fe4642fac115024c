"""`homeforge serve`: the OpenAI-compatible HTTP API (FastAPI) and the process that runs it.

Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings,
/v1/classifications, /health, /ready, /metrics, /admin/reload, /openapi.json. Errors use
the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.

Layout of ``serve/``: ``protocol`` (request schemas), ``errors`` (error shape, handlers),
``state`` (ServerState, model loading), ``middleware`` (keys before the body; metrics and
audit), ``calls`` (what every call goes through, HTTP or gRPC: keys, tokens, audit),
``driver`` (the generation-driver interface, the token ledger), ``local`` (the driver over
the in-process engine), ``gateway/`` (the driver over upstream servers), ``routes/`` (one
router per endpoint family), ``rpc/`` (gRPC), ``openapi``, ``net`` (host forms, binding),
and this module: ``create_app`` and ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from homeforge.config import ServeConfig
from homeforge.errors import HomeforgeError
from homeforge.serve.auth import KeyStore
from homeforge.serve.errors import ApiError, error_body, install_handlers
from homeforge.serve.middleware import GuardMiddleware, ObserveMiddleware
from homeforge.serve.net import bind, is_loopback, url
from homeforge.serve.openapi import document
from homeforge.serve.routes import ROUTERS
from homeforge.serve.state import ServerState, detect_kind, load_model, resolve_backend

__all__ = ["ApiError", "Runner", "ServerState", "check_bind", "create_app", "detect_kind", "error_body", "is_loopback",
           "load_model", "resolve_backend", "serve"]


@asynccontextmanager
async def _lifespan(app: FastAPI):
    st: ServerState = app.state.server
    await st.driver.startup(app.state.load)  # loads in the background: /health answers meanwhile
    rpc = None
    watch = asyncio.create_task(_follow_alias(st)) if st.follow is not None else None
    try:
        if st.cfg.grpc_port is not None:
            from homeforge.serve.rpc.server import start_grpc

            rpc = await start_grpc(st)
        yield
    finally:
        if watch is not None:
            watch.cancel()
        if rpc is not None:  # graceful: streams in flight finish (uvicorn has drained HTTP already)
            await rpc.stop(st.cfg.graceful_timeout or None)
        await st.driver.shutdown()
        st.close_ledgers()
        if st.audit is not None:
            await asyncio.to_thread(st.audit.flush)
        if st.feedback is not None:
            await asyncio.to_thread(st.feedback.flush)


async def _follow_alias(st: ServerState) -> None:
    """registry:NAME@ALIAS: swap in the version the alias names whenever the registry index changes."""
    while True:
        await asyncio.sleep(st.cfg.registry_poll)
        if not st.ready or not await asyncio.to_thread(st.follow.changed):
            continue
        try:
            await st.driver.swap_to_alias()
        except Exception as exc:  # the old version keeps serving; /ready shows why the new one did not load
            st.swap_error = exc.render() if isinstance(exc, HomeforgeError) else f"{type(exc).__name__}: {exc}"


async def _openapi(request: Request):
    st: ServerState = request.app.state.server
    return document(request.app, st.keys_required())


def create_app(cfg: ServeConfig, state: ServerState | None = None, load: bool = True) -> FastAPI:
    """The FastAPI app; the model loads in a background thread at startup (see /ready)."""
    st = state or ServerState(cfg)
    if st.driver is None:
        st.driver = make_driver(st)
    app = FastAPI(title="homeforge", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server, app.state.load = st, load
    install_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_api_route("/openapi.json", _openapi, methods=["GET"], include_in_schema=False)
    # middleware runs outermost-last-added: observe -> CORS (answers preflights) -> keys -> routes
    app.add_middleware(GuardMiddleware, state=st)
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(ObserveMiddleware, state=st)
    return app


def gateway_mode(cfg: ServeConfig) -> bool:
    """Upstream servers instead of the in-process engine: ``upstreams``, a managed command, or ``backend: vllm``."""
    return bool(cfg.upstreams or cfg.gateway.command) or cfg.backend == "vllm"


def make_driver(st: ServerState):
    """The driver for the config: the gateway over upstream servers, else the in-process engine."""
    if gateway_mode(st.cfg):
        from homeforge.serve.gateway import GatewayDriver

        return GatewayDriver(st)
    if st.cfg.ab.candidate:  # live A/B: champion and candidate in this process
        from homeforge.serve.ab import ABDriver

        return ABDriver(st)
    from homeforge.serve.local import LocalDriver  # torch: only when this process runs the model

    return LocalDriver(st)


# --------------------------------------------------------------------------- running


def check_bind(cfg: ServeConfig, keys: KeyStore) -> None:
    """Refuse a non-loopback address (0.0.0.0, ::, a LAN name) unless API keys are required."""
    if is_loopback(cfg.host):
        return
    if cfg.require_keys is False or not keys.active():
        raise HomeforgeError(
            f"refusing to listen on {cfg.host} without API keys: anyone on the network could use the model",
            where=str(keys.path),
            fix="create a key first (`homeforge keys add --name app --role user`), or bind to 127.0.0.1 or ::1")


def uvicorn_server(config):
    """A uvicorn server that remembers the signals that stopped it instead of re-raising them."""
    import uvicorn

    class Server(uvicorn.Server):
        stopped_by: list[int] = []

        def handle_exit(self, sig, frame):
            self.stopped_by.append(sig)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in original.items():
                    signal.signal(s, handler)

    server = Server(config)
    server.stopped_by = []
    return server


class Runner:
    """One server process: checks, the bound socket, the app and uvicorn; ``run`` blocks until stopped."""

    def __init__(self, cfg: ServeConfig, console=None):
        import uvicorn

        from homeforge.models.io import check_model_dir
        from homeforge.registry.follow import resolve
        from homeforge.serve.audit import RequestAudit

        cfg, follow, _ = resolve(cfg)  # registry:NAME@ALIAS: the version's folder (a missing name fails here)
        cfg = resolve_backend(cfg)
        gateway = gateway_mode(cfg)
        if cfg.backend == "torch" and not gateway:
            check_model_dir(cfg.model_dir or "")
        keys = KeyStore.open(cfg.keys_file)
        check_bind(cfg, keys)
        if cfg.grpc_port is not None:
            from homeforge.serve.rpc.server import reserve_port

            cfg = cfg.model_copy(update={"grpc_port": reserve_port(cfg.host, cfg.grpc_port)})
        self.audit = RequestAudit(cfg.audit_file, log_text=cfg.audit_text)
        self.state = ServerState(cfg, keys=keys, audit=self.audit)
        if follow is not None:
            self.state.follow, self.state.version = follow, follow.current().label
        self.state.driver = make_driver(self.state)  # the gateway checks its upstreams here, before binding
        self.sock = bind(cfg.host, cfg.port)
        self.url = url(cfg.host, self.sock.getsockname()[1])
        app = create_app(cfg, self.state)
        if console is not None:
            auth = f"API keys required ({len(keys.active())} active)" if self.state.keys_required() \
                else "no API keys (loopback only)"
            what = getattr(self.state.driver, "describe", lambda: self.state.name)()
            console.print(f"serving [bold]{what}[/] at {self.url}/v1 — {auth}; audit: {self.audit.path}",
                          highlight=False)
            if cfg.grpc_port is not None:
                console.print(f"gRPC (homeforge.v1.Inference) at {url(cfg.host, cfg.grpc_port)[7:]}", highlight=False)
        self.server = uvicorn_server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                     timeout_graceful_shutdown=int(cfg.graceful_timeout) or None))

    def run(self) -> None:
        from homeforge.security.audit_command import note_command

        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.audit.close()
            self.sock.close()
        if self.server.stopped_by:
            note_command(stopped_by=signal.Signals(self.server.stopped_by[0]).name)
            if signal.SIGINT in self.server.stopped_by:
                raise KeyboardInterrupt

    def stop(self) -> None:
        self.server.should_exit = True


def serve(cfg: ServeConfig, console=None) -> None:
    """Run the server in this process until SIGINT/SIGTERM (then finish in-flight requests).

    SIGTERM ends it normally (exit 0: the usual way a service is stopped); SIGINT raises
    KeyboardInterrupt once the server has drained, as Ctrl-C does for every command. Either
    way the command's audit line is written (it names the signal).
    """
    Runner(cfg, console).run()
