"""The OpenAI-compatible HTTP API of `homeforge serve` (FastAPI).

Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings,
/v1/classifications, /health, /ready, /metrics, /admin/reload. Errors use the OpenAI
error shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import ipaddress
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from homeforge.config import ServeConfig
from homeforge.errors import HomeforgeError
from homeforge.serve.auth import KeyStore, RateLimiter
from homeforge.serve.engine import (
    Delta,
    Engine,
    Finish,
    GenRequest,
    NotAccepting,
    QueueFull,
    TorchBackend,
)
from homeforge.serve.metrics import Metrics

INFERENCE = ("admin", "user")
MAX_BODY_BYTES = 32 << 20  # a request body above this is refused (413) before it is read
ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classifications",
          "/health", "/ready", "/metrics", "/admin/reload"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type_, param, code, headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --------------------------------------------------------------------------- request schemas


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class StreamOptions(_Req):
    include_usage: bool = True


class _Sampling(_Req):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatMessage(_Req):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingRequest(_Req):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"


class ClassificationRequest(_Req):
    model: str | None = None
    input: str | list[str]


# --------------------------------------------------------------------------- model loading


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def detect_kind(model_dir: Path) -> str:
    from homeforge.models.io import classifier_architecture

    return "classifier" if classifier_architecture(model_dir) else "causal"


def resolve_backend(cfg: ServeConfig) -> ServeConfig:
    """``backend=auto``: ONNX Runtime for a directory that holds an ONNX graph and no weights, else PyTorch."""
    if cfg.backend != "auto":
        return cfg
    p = Path(cfg.model_dir or "")
    onnx_only = (p / cfg.onnx_file).is_file() and not any(p.glob("*.safetensors")) and not any(p.glob("*.bin"))
    return cfg.model_copy(update={"backend": "onnx" if onnx_only else "torch"})


def load_model(cfg: ServeConfig):
    """(kind, model, tokenizer, backend) for ``cfg.model_dir`` and ``cfg.backend``."""
    from homeforge.models.io import check_model_dir, load_causal_lm, load_classifier, load_tokenizer

    cfg = resolve_backend(cfg)
    if cfg.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise HomeforgeError("the vLLM backend needs the `vllm` package, which is not installed",
                                 fix="install it on a GPU machine (pip install vllm), or use --backend torch") from None
        raise HomeforgeError("vLLM is installed: serve the same model directory with its own server",
                             fix=f"run `vllm serve {cfg.model_dir}` (the directory is a plain Hugging Face model); "
                                 "homeforge's in-process engine is --backend torch")
    if cfg.backend == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise HomeforgeError("the ONNX Runtime backend needs the onnxruntime package",
                                 fix="pip install 'homeforge[export]', or use --backend torch") from None
        from homeforge.serve.backends import OnnxBackend

        p = Path(cfg.model_dir or "")
        if not (p / "config.json").is_file():
            raise HomeforgeError(f"{p} is not an exported model directory (no config.json)", where=str(p),
                                 fix="pass the output of `homeforge export MODEL --format onnx`")
        backend = OnnxBackend(p, cfg.onnx_file, cfg.threads)
        return "causal", None, load_tokenizer(p), backend
    p = check_model_dir(cfg.model_dir or "")
    kind = detect_kind(p)
    if kind == "classifier":
        model, tok = load_classifier(p)
        return kind, model, tok, None
    model, tok = load_causal_lm(p)
    return kind, model, tok, TorchBackend(model)


# --------------------------------------------------------------------------- server state


class ServerState:
    def __init__(self, cfg: ServeConfig, keys: KeyStore | None = None, audit=None):
        self.cfg = cfg
        self.name = cfg.model_name or (Path(cfg.model_dir).name if cfg.model_dir else "model")
        self.keys = keys if keys is not None else KeyStore.open(cfg.keys_file)
        self.limiter = RateLimiter()
        self.metrics = Metrics()
        self.audit = audit
        self.engine: Engine | None = None
        self.kind = "causal"
        self.model = None
        self.tok = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self._cls_lock = threading.Lock()
        self.ready = False

    def load(self) -> None:
        import torch

        try:
            if self.cfg.threads:
                torch.set_num_threads(self.cfg.threads)
            self.cfg = resolve_backend(self.cfg)
            self.kind, self.model, self.tok, backend = load_model(self.cfg)
            if backend is not None:
                # the engine thread gets its own tokenizer: a Rust tokenizer shared between threads can
                # fail with 'Already borrowed' when one thread changes its settings
                self.engine = Engine(backend, copy.deepcopy(self.tok), max_batch_size=self.cfg.max_batch_size,
                                     max_queue=self.cfg.max_queue, max_context=self.cfg.max_context,
                                     on_step=self.metrics.on_step).start()
            self.ready = True
        except Exception as exc:  # shown by /ready and the log; the process keeps answering /health
            self.load_error = exc.render() if isinstance(exc, HomeforgeError) else f"{type(exc).__name__}: {exc}"

    @property
    def max_context(self) -> int:
        if self.engine is not None:
            return self.engine.max_context
        return int(self.cfg.max_context or getattr(self.model.config, "max_position_embeddings", 512) or 512)

    def keys_required(self) -> bool:
        if self.cfg.require_keys is not None:
            return self.cfg.require_keys
        return bool(self.keys.active())

    def generation_config(self):
        if self.model is not None:
            return getattr(self.model, "generation_config", None)
        if not hasattr(self, "_gen_cfg"):
            from transformers import GenerationConfig

            try:
                self._gen_cfg = GenerationConfig.from_pretrained(self.cfg.model_dir, local_files_only=True)
            except OSError:
                self._gen_cfg = None
        return self._gen_cfg

    @property
    def vocab_size(self) -> int:
        if self.engine is not None:
            return self.engine.backend.vocab_size
        return int(self.model.config.vocab_size)

    def stop_ids(self, chat: bool) -> set[int]:
        ids: set[int] = set()
        if self.tok.eos_token_id is not None:
            ids.add(int(self.tok.eos_token_id))
        gen_eos = getattr(self.generation_config(), "eos_token_id", None)
        if gen_eos is not None:
            ids |= {int(x) for x in (gen_eos if isinstance(gen_eos, list) else [gen_eos])}
        if chat:
            for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
                tid = self.tok.convert_tokens_to_ids(t)
                if isinstance(tid, int) and tid != self.tok.unk_token_id and tid >= 0:
                    ids.add(tid)
        return ids


# --------------------------------------------------------------------------- middleware: metrics + audit


class ObserveMiddleware:
    """Counts every request by route/status/role, times it to the last byte, writes its audit line."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        scope.setdefault("state", {})
        info = {"status": 500}
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            body = json.dumps(error_body(f"the request body is larger than {MAX_BODY_BYTES >> 20} MB" if length.isdigit()
                                         else "invalid Content-Length header", "invalid_request_error")).encode()
            status = 413 if length.isdigit() else 400
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            self._record(scope, status, time.perf_counter() - t0)
            return

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                info["done"] = True

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._record(scope, info["status"], time.perf_counter() - t0)

    def _record(self, scope, status: int, seconds: float) -> None:
        st = scope.get("state", {})
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        role = st.get("role", "none")
        m = self.state.metrics
        m.requests.labels(route, str(status), role).inc()
        m.latency.labels(route).observe(seconds)
        if self.state.audit is not None and route not in ("/health", "/ready", "/metrics"):
            rec = {"event": "serve.request", "route": route, "method": scope.get("method"), "status": status,
                   "latency_ms": round(seconds * 1000, 2), "key_id": st.get("key_id"), "role": role,
                   "model": st.get("model"), "prompt_tokens": st.get("prompt_tokens"),
                   "completion_tokens": st.get("completion_tokens"),
                   "client": (scope.get("client") or [None])[0]}
            if "prompt_text" in st:
                rec["prompt"] = st["prompt_text"]
                rec["completion"] = st.get("completion_text", "")
            self.state.audit.append(rec)
            m.audit_errors.set(self.state.audit.errors)


# --------------------------------------------------------------------------- the app


def create_app(cfg: ServeConfig, state: ServerState | None = None, load: bool = True) -> FastAPI:
    """The FastAPI app; the model loads in a background thread at startup (see /ready)."""
    from contextlib import asynccontextmanager

    st = state or ServerState(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load and not st.ready:
            threading.Thread(target=st.load, name="homeforge-load", daemon=True).start()
        yield
        if st.engine is not None:  # graceful: finish what was accepted
            await asyncio.to_thread(st.engine.shutdown, True, cfg.graceful_timeout or None)
        if st.audit is not None:
            await asyncio.to_thread(st.audit.flush)

    app = FastAPI(title="homeforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = st
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(ObserveMiddleware, state=st)

    # ------------------------------------------------------------------ errors

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        by_field: dict[str, list[dict]] = {}
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", []) if x != "body"]
            if e.get("type") == "json_invalid" or (loc == [] and e.get("type") in ("model_attributes_type",
                                                                                 "dict_type")):
                return JSONResponse(error_body("the request body must be a JSON object (check the JSON syntax "
                                               "and the Content-Type: application/json header)",
                                               "invalid_request_error"), status_code=400)
            by_field.setdefault(loc[0] if loc else "body", []).append({**e, "loc": loc})
        parts, param = [], None
        for field, errs in list(by_field.items())[:5]:
            param = param or field
            e = errs[0]
            if e.get("type") == "missing":
                parts.append(f"{'.'.join(e['loc'])} is required")
            elif field in ("prompt", "input") and len(errs) > 1:
                parts.append(f"{field} must be a string, a list of strings, a list of token ids or a list of "
                             f"token-id lists (given {str(e.get('input'))[:60]!r})")
            elif len(errs) > 1:
                parts.append(f"{field}: {str(e.get('input'))[:60]!r} is not an accepted value")
            else:
                sub = ".".join(e["loc"])
                parts.append(f"{sub}: {e.get('msg')} (given {str(e.get('input'))[:60]!r})")
        return JSONResponse(error_body("; ".join(parts) or "invalid request", "invalid_request_error", param),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    # ------------------------------------------------------------------ auth

    def authorize(request: Request, roles: tuple[str, ...], rate_limit: bool = True) -> None:
        rs = request.state
        st.keys.reload_if_changed()
        if not st.keys_required():
            rs.role = "anonymous"
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            raise ApiError(401, "an API key is required: send it as 'Authorization: Bearer KEY'",
                           "authentication_error", code="missing_api_key")
        key = st.keys.verify(token)
        if key is None:
            raise ApiError(401, "invalid or revoked API key", "authentication_error", code="invalid_api_key")
        rs.role, rs.key_id = key.role, key.id
        rs.api_key = key
        if key.role not in roles:
            raise ApiError(403, f"the key's role {key.role!r} may not use {request.url.path} "
                                f"(allowed: {', '.join(roles)})", "permission_error", code="forbidden")
        if rate_limit:
            why = st.limiter.check(key)
            if why:
                st.metrics.rejected.labels("rate_limit").inc()
                raise ApiError(429, why, "rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(st.limiter.retry_after(key.id))})

    def role(*roles: str, rate_limit: bool = True):
        """A dependency: runs before the body is validated, so a caller without a key learns nothing more."""

        def check(request: Request) -> None:
            authorize(request, roles, rate_limit)

        return check

    def need_ready(request: Request, model: str | None, kind: str = "causal") -> None:
        if not st.ready:
            msg = f"the model failed to load: {st.load_error}" if st.load_error else "the model is still loading"
            raise ApiError(503, msg, "service_unavailable", code="not_ready")
        if model is not None and model != st.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {st.name!r}",
                           "invalid_request_error", "model", "model_not_found")
        if kind != st.kind:
            what = {"causal": "text generation", "classifier": "classification"}[kind]
            raise ApiError(400, f"{st.name!r} is a {st.kind} model and does not support {what}",
                           "invalid_request_error", "model", "unsupported_model")
        request.state.model = st.name

    # ------------------------------------------------------------------ simple routes

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if st.ready:
            return {"status": "ready", "model": st.name, "kind": st.kind}
        body = error_body(f"the model failed to load: {st.load_error}" if st.load_error else "loading",
                          "service_unavailable", code="not_ready")
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request, _=Depends(role("admin", "metrics", rate_limit=False))):
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request, _=Depends(role(*INFERENCE))):
        data = [{"id": st.name, "object": "model", "created": st.created, "owned_by": "homeforge",
                 "max_model_len": st.max_context if st.ready else None}] if st.ready else []
        return {"object": "list", "data": data}

    @app.post("/admin/reload")
    async def reload(request: Request, _=Depends(role("admin", rate_limit=False))):
        need_ready(request, None, st.kind)
        if st.engine is None:
            raise ApiError(400, "reload is supported for generative models only", code="unsupported_model")
        kind, model, tok, backend = await asyncio.to_thread(load_model, st.cfg)

        def swap():
            st.engine.backend, st.model, st.tok = backend, model, tok
            st.engine.tok = copy.deepcopy(tok)

        await asyncio.wrap_future(st.engine.call(swap, when_idle=True))
        return {"status": "reloaded", "model": st.name}

    # ------------------------------------------------------------------ generation helpers

    def encode_prompt(prompt, param: str = "prompt") -> list[list[int]]:
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise ApiError(400, f"{param} must not be empty", param=param)
        out = []
        vocab = len(st.tok)
        for p in prompts:
            if isinstance(p, str):
                ids = st.tok(p)["input_ids"]
            else:
                ids = list(p)
                bad = [t for t in ids if not 0 <= t < max(vocab, st.vocab_size)]
                if bad:
                    raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                   param=param)
            if not ids:
                bos = st.tok.bos_token_id if st.tok.bos_token_id is not None else st.tok.eos_token_id
                ids = [bos]
            out.append(ids)
        return out

    def check_lengths(prompts: list[list[int]], max_tokens: int | None) -> int:
        ctx = st.max_context
        longest = max(len(p) for p in prompts)
        if longest > ctx:
            raise ApiError(413, f"the prompt has {longest} tokens; this model's context is {ctx} tokens",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            return max(0, min(cfg.max_tokens_default, ctx - longest))
        if longest + max_tokens > ctx:
            raise ApiError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                                f"{ctx} tokens; lower max_tokens to at most {ctx - longest}",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def stops(stop) -> list[str]:
        s = [stop] if isinstance(stop, str) else list(stop or [])
        if len(s) > 16 or any(not x for x in s):
            raise ApiError(400, "stop must be up to 16 non-empty strings", param="stop")
        return s

    async def run(request: Request, reqs: list[GenRequest], events: asyncio.Queue):
        """Submit and yield (index, event) until every request has finished."""
        try:
            st.engine.submit(reqs)
        except QueueFull as exc:
            st.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"{exc}; retry shortly", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except NotAccepting as exc:
            raise ApiError(503, str(exc), "service_unavailable", code="shutting_down") from None
        left = len(reqs)
        checked = time.monotonic()
        try:
            while left:
                try:
                    i, ev = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    ev = None
                if time.monotonic() - checked > 0.5:  # also while tokens keep coming
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if ev is None:
                    continue
                if isinstance(ev, Finish):
                    left -= 1
                yield i, ev
        finally:
            for r in reqs:  # a client that went away frees its slots
                r.cancel()

    def make_requests(prompts, body, max_tokens, events, loop, *, chat: bool, logprobs: int | None,
                      echo_lp: bool) -> list[GenRequest]:
        reqs = []
        stop_ids = set() if body.ignore_eos else st.stop_ids(chat)
        stop = stops(body.stop)
        for pi, ids in enumerate(prompts):
            for j in range(body.n):
                idx = pi * body.n + j

                def sink(ev, idx=idx):
                    try:
                        loop.call_soon_threadsafe(events.put_nowait, (idx, ev))
                    except RuntimeError:  # the event loop is gone (server stopping)
                        pass

                reqs.append(GenRequest(ids, max_tokens, sink, temperature=body.temperature, top_p=body.top_p,
                                       top_k=max(body.top_k, 0),
                                       seed=None if body.seed is None else body.seed + j,
                                       stop=stop, stop_ids=stop_ids, logprobs=logprobs, echo_logprobs=echo_lp))
        return reqs

    def account(request: Request, prompt_tokens: int, completion_tokens: int, route: str, reqs) -> None:
        rs = request.state
        rs.prompt_tokens, rs.completion_tokens = prompt_tokens, completion_tokens
        st.metrics.prompt_tokens.inc(prompt_tokens)
        st.metrics.completion_tokens.inc(completion_tokens)
        for r in reqs:
            if r.first_token_at is not None:
                st.metrics.ttft.labels(route).observe(r.first_token_at - r.submitted)
        key = getattr(rs, "api_key", None)
        if key is not None:
            st.limiter.add_tokens(key.id, prompt_tokens + completion_tokens)

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()

    # ------------------------------------------------------------------ /v1/completions

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest, _=Depends(role(*INFERENCE))):
        need_ready(request, body.model)
        prompts = encode_prompt(body.prompt)
        max_tokens = check_lengths(prompts, body.max_tokens)
        if body.stream and body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported when streaming", param="stream")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs = make_requests(prompts, body, max_tokens, events, loop, chat=False, logprobs=body.logprobs,
                             echo_lp=body.echo and body.logprobs is not None)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n_prompt = sum(len(p) for p in prompts) * body.n
        if cfg.audit_text:
            request.state.prompt_text = body.prompt if isinstance(body.prompt, str) else json.dumps(body.prompt)

        def chunk(i, text, reason=None, lp=None):
            return {"id": cid, "object": "text_completion", "created": created, "model": st.name,
                    "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}]}

        if body.stream:
            gen = run(request, reqs, events)
            first = await _first(gen)  # errors such as a full queue must become a status code, not a stream

            async def stream():
                done = 0
                texts = [""] * len(reqs)
                try:
                    if body.echo:
                        for i, r in enumerate(reqs):
                            yield sse(chunk(i, st.tok.decode(r.prompt_ids)))
                    async for i, ev in _chain(first, gen):
                        if isinstance(ev, Delta):
                            if ev.text:
                                lp = _legacy_lp(ev.tokens, len(texts[i])) if body.logprobs is not None else None
                                texts[i] += ev.text
                                yield sse(chunk(i, ev.text, lp=lp))
                        else:
                            done += ev.completion_tokens
                            yield sse(chunk(i, "", _reason(ev)))
                    account(request, n_prompt, done, "/v1/completions", reqs)
                    if cfg.audit_text:
                        request.state.completion_text = "\n".join(texts)
                    if body.stream_options is None or body.stream_options.include_usage:
                        yield sse({"id": cid, "object": "text_completion", "created": created, "model": st.name,
                                   "choices": [], "usage": _usage(n_prompt, done)})
                    yield b"data: [DONE]\n\n"
                finally:
                    for r in reqs:
                        r.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = [""] * len(reqs)
        prompt_infos: list[list] = [[] for _ in reqs]
        gen_infos: list[list] = [[] for _ in reqs]
        fins: list[Finish | None] = [None] * len(reqs)
        async for i, ev in run(request, reqs, events):
            if isinstance(ev, Delta):
                if ev.prompt:
                    prompt_infos[i] = ev.tokens
                    continue
                texts[i] += ev.text
                gen_infos[i] += ev.tokens
            else:
                fins[i] = ev
        if any(f is None for f in fins):
            return Response(status_code=499)  # the client went away
        errors = [f.error for f in fins if f.reason == "error"]
        if errors:
            raise ApiError(500, f"generation failed: {errors[0]}", "server_error")
        choices = []
        for i, r in enumerate(reqs):
            prompt_text = st.tok.decode(r.prompt_ids) if body.echo else ""
            lp = None
            if body.logprobs is not None:
                infos = (prompt_infos[i] if body.echo else []) + gen_infos[i]
                lp = _legacy_lp(infos, 0)
            choices.append({"index": i, "text": prompt_text + texts[i], "logprobs": lp,
                            "finish_reason": _reason(fins[i])})
        n_out = sum(f.completion_tokens for f in fins)
        account(request, n_prompt, n_out, "/v1/completions", reqs)
        if cfg.audit_text:
            request.state.completion_text = "\n".join(texts)
        return {"id": cid, "object": "text_completion", "created": created, "model": st.name,
                "choices": choices, "usage": _usage(n_prompt, n_out)}

    def _legacy_lp(infos, offset0: int) -> dict:
        tokens, tlp, top, offs = [], [], [], []
        off = offset0
        for t in infos:
            tokens.append(t.text)
            tlp.append(t.logprob)
            top.append(None if t.top is None or t.logprob is None else
                       {st.tok.decode([k]): v for k, v in t.top.items()})
            offs.append(off)
            off += len(t.text)
        return {"tokens": tokens, "token_logprobs": tlp, "top_logprobs": top, "text_offset": offs}

    # ------------------------------------------------------------------ /v1/chat/completions

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest, _=Depends(role(*INFERENCE))):
        need_ready(request, body.model)
        if not getattr(st.tok, "chat_template", None):
            raise ApiError(400, f"{st.name!r} has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        msgs = []
        for m in body.messages:
            c = m.content
            if isinstance(c, list):
                c = "".join(p.get("text", "") for p in c if p.get("type") == "text")
            msgs.append({"role": m.role, "content": c or ""})
        try:
            text = st.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template that rejects this conversation (e.g. role order)
            raise ApiError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        ids = st.tok(text, add_special_tokens=False)["input_ids"]
        max_tokens = check_lengths([ids], body.max_completion_tokens or body.max_tokens)
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is None:
            top = 0
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs = make_requests([ids], body, max_tokens, events, loop, chat=True, logprobs=top, echo_lp=False)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        n_prompt = len(ids) * body.n
        if cfg.audit_text:
            request.state.prompt_text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs)

        def chat_lp(infos):
            return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                                 "top_logprobs": [{"token": st.tok.decode([k]), "logprob": v,
                                                   "bytes": list(st.tok.decode([k]).encode())}
                                                  for k, v in (t.top or {}).items()]} for t in infos]}

        def chunk(i, delta, reason=None, lp=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": st.name,
                    "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}]}

        if body.stream:
            gen = run(request, reqs, events)
            first = await _first(gen)

            async def stream():
                done = 0
                texts = [""] * len(reqs)
                try:
                    for i in range(len(reqs)):
                        yield sse(chunk(i, {"role": "assistant", "content": ""}))
                    async for i, ev in _chain(first, gen):
                        if isinstance(ev, Delta):
                            if ev.text:
                                texts[i] += ev.text
                                yield sse(chunk(i, {"content": ev.text},
                                                lp=chat_lp(ev.tokens) if body.logprobs else None))
                        else:
                            done += ev.completion_tokens
                            yield sse(chunk(i, {}, _reason(ev)))
                    account(request, n_prompt, done, "/v1/chat/completions", reqs)
                    if cfg.audit_text:
                        request.state.completion_text = "\n".join(texts)
                    if body.stream_options is None or body.stream_options.include_usage:
                        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                   "model": st.name, "choices": [], "usage": _usage(n_prompt, done)})
                    yield b"data: [DONE]\n\n"
                finally:
                    for r in reqs:
                        r.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = [""] * len(reqs)
        infos: list[list] = [[] for _ in reqs]
        fins: list[Finish | None] = [None] * len(reqs)
        async for i, ev in run(request, reqs, events):
            if isinstance(ev, Delta):
                texts[i] += ev.text
                infos[i] += ev.tokens
            else:
                fins[i] = ev
        if any(f is None for f in fins):
            return Response(status_code=499)
        errors = [f.error for f in fins if f.reason == "error"]
        if errors:
            raise ApiError(500, f"generation failed: {errors[0]}", "server_error")
        n_out = sum(f.completion_tokens for f in fins)
        account(request, n_prompt, n_out, "/v1/chat/completions", reqs)
        if cfg.audit_text:
            request.state.completion_text = "\n".join(texts)
        return {"id": cid, "object": "chat.completion", "created": created, "model": st.name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                             "logprobs": chat_lp(infos[i]) if body.logprobs else None,
                             "finish_reason": _reason(fins[i])} for i in range(len(reqs))],
                "usage": _usage(n_prompt, n_out)}

    # ------------------------------------------------------------------ /v1/embeddings

    @app.post("/v1/embeddings")
    async def embeddings(request: Request, body: EmbeddingRequest, _=Depends(role(*INFERENCE))):
        need_ready(request, body.model, st.kind)
        prompts = encode_prompt(body.input, "input")
        ctx = st.max_context
        if max(len(p) for p in prompts) > ctx:
            raise ApiError(413, f"an input is longer than the context of {ctx} tokens", param="input",
                           code="context_length_exceeded")
        if st.model is None:
            raise ApiError(400, f"embeddings need the PyTorch backend (this server runs {st.cfg.backend})",
                           code="unsupported_backend")
        if st.engine is not None:
            vecs = await asyncio.wrap_future(st.engine.call(lambda: _embed(st.model, prompts)))
        else:
            vecs = await asyncio.to_thread(_locked, st._cls_lock, _embed, st.model, prompts)
        n = sum(len(p) for p in prompts)
        request.state.prompt_tokens, request.state.completion_tokens = n, 0
        st.metrics.prompt_tokens.inc(n)
        data = []
        for i, v in enumerate(vecs):
            emb = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() \
                if body.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": st.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    # ------------------------------------------------------------------ /v1/classifications

    @app.post("/v1/classifications")
    async def classifications(request: Request, body: ClassificationRequest, _=Depends(role(*INFERENCE))):
        need_ready(request, body.model, "classifier")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise ApiError(400, "input must not be empty", param="input")
        out = await asyncio.to_thread(_locked, st._cls_lock, _classify, st.model, st.tok, texts, st.max_context)
        request.state.prompt_tokens = out[1]
        return {"object": "list", "model": st.name, "data": out[0],
                "usage": {"prompt_tokens": out[1], "total_tokens": out[1]}}

    return app


# --------------------------------------------------------------------------- helpers


async def _first(gen):
    """Start an async generator so that its submit errors are raised now; return its first item."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first, gen):
    if first is not None:
        yield first
        async for item in gen:
            yield item


def _reason(f: Finish) -> str:
    return {"stop": "stop", "length": "length"}.get(f.reason, f.reason)


def _usage(p: int, c: int) -> dict:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _locked(lock, fn, *args):
    with lock:
        return fn(*args)


def _embed(model, prompts: list[list[int]]):
    """Mean-pooled last hidden state, L2-normalised, one vector per prompt."""
    import torch

    vecs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            h = out.hidden_states[-1][0].float().mean(dim=0)
            vecs.append(torch.nn.functional.normalize(h, dim=0))
    return vecs


def _classify(model, tok, texts: list[str], max_len: int):
    import torch

    labels = getattr(model.config, "id2label", None) or {}
    data, n = [], 0
    with torch.inference_mode():
        for i, t in enumerate(texts):
            enc = tok(t, return_tensors="pt", truncation=True, max_length=max_len)
            n += int(enc["input_ids"].shape[1])
            probs = torch.softmax(model(**enc).logits[0].float(), dim=-1)
            k = int(torch.argmax(probs))
            data.append({"index": i, "label": str(labels.get(k, labels.get(str(k), k))), "score": float(probs[k]),
                         "scores": {str(labels.get(j, labels.get(str(j), j))): float(p) for j, p in enumerate(probs)}})
    return data, n


# --------------------------------------------------------------------------- running


def check_bind(cfg: ServeConfig, keys: KeyStore) -> None:
    if is_loopback(cfg.host):
        return
    if cfg.require_keys is False or not keys.active():
        raise HomeforgeError(
            f"refusing to listen on {cfg.host} without API keys: anyone on the network could use the model",
            where=str(keys.path),
            fix="create a key first (`homeforge keys add --name app --role user`), or bind to 127.0.0.1")


def serve(cfg: ServeConfig, console=None) -> None:
    """Run the server in this process until SIGINT/SIGTERM (then finish in-flight requests)."""
    import uvicorn

    from homeforge.models.io import check_model_dir
    from homeforge.serve.audit import RequestAudit

    cfg = resolve_backend(cfg)
    if cfg.backend == "torch":
        check_model_dir(cfg.model_dir or "")
    keys = KeyStore.open(cfg.keys_file)
    check_bind(cfg, keys)
    audit = RequestAudit(cfg.audit_file, log_text=cfg.audit_text)
    state = ServerState(cfg, keys=keys, audit=audit)
    app = create_app(cfg, state)
    if console is not None:
        auth = f"API keys required ({len(keys.active())} active)" if state.keys_required() else "no API keys (loopback only)"
        console.print(f"serving [bold]{state.name}[/] at http://{cfg.host}:{cfg.port}/v1 — {auth}; "
                      f"audit: {audit.path}", highlight=False)
    uv = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                        timeout_graceful_shutdown=int(cfg.graceful_timeout) or None)
    try:
        uvicorn.Server(uv).run()
    finally:
        audit.close()
