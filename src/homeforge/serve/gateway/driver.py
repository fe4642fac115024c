"""``GatewayDriver``: the generation driver over upstream OpenAI-compatible servers.

The routes, keys, roles, limits, ledger, metrics and audit are homeforge's own; this driver
decides where a validated request goes and relays the answer. Model names: with an alias
(``model_name``, or the name of the model directory given) clients see one model whatever
the upstreams call it; without one, ``/v1/models`` lists what the healthy upstreams serve
and a request goes to an upstream serving the model it names.

Token counts come from the upstream's ``usage`` (asked for in streams with
``stream_options.include_usage``); without it from the local tokenizer when a model directory
is given, else from the stream's chunks. Before a request runs, its prompt is counted with
the tokenizer, or estimated at one token per character (the reservation is settled to the
real count when it ends).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from homeforge.errors import HomeforgeError
from homeforge.serve.driver import Ledger
from homeforge.serve.errors import ApiError
from homeforge.serve.gateway.job import GatewayJob, Refusal, refusal
from homeforge.serve.gateway.managed import managed_upstream
from homeforge.serve.gateway.pool import Pool, Upstream, make_upstream
from homeforge.serve.gateway.relay import GatewayGeneration
from homeforge.serve.protocol import (
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from homeforge.serve.state import ServerState


class GatewayDriver:
    def __init__(self, state: ServerState):
        cfg = state.cfg
        self.st = state
        self.alias = cfg.model_name or (Path(cfg.model_dir).name if cfg.model_dir else None)
        ups = [make_upstream(u, cfg.gateway) for u in cfg.upstreams]
        self.managed = None
        child = managed_upstream(cfg)
        if child is not None:
            self.managed, key = child
            ups.append(Upstream(self.managed.url, key=key, managed=self.managed))
        if not ups:
            raise HomeforgeError("gateway mode needs at least one upstream", fix="pass --upstream URL")
        self.pool = Pool(ups, cfg.gateway, state.metrics.registry, self._changed)
        self.tok = None
        state.name = self.name
        state.kind = "gateway"
        state.waiting = "checking the upstreams"

    @property
    def name(self) -> str:
        return self.alias or "gateway"

    def describe(self) -> str:
        ups = ", ".join(u.url + (" (managed: log " + str(u.managed.log_path) + ")" if u.managed else "")
                        for u in self.pool.ups)
        return f"{self.name} (gateway to {ups})"

    def _changed(self) -> None:
        st = self.st
        st.ready = bool(self.pool.healthy())
        st.waiting = None if st.ready else self.pool.summary()

    # ------------------------------------------------------------------ lifespan

    async def startup(self, load: bool = True) -> None:
        cfg = self.st.cfg
        if load and cfg.model_dir:
            self.tok = await asyncio.to_thread(_counting_tokenizer, Path(cfg.model_dir))
        if self.managed is not None:
            self.managed.start()
            self.pool.notify(f"started {self.managed.what} (pid {self.managed.proc.pid}) at {self.managed.url}; "
                             f"log: {self.managed.log_path}")
        await self.pool.start()

    async def shutdown(self) -> None:
        await self.pool.stop()
        if self.managed is not None:
            await asyncio.to_thread(self.managed.stop)

    # ------------------------------------------------------------------ checks and preparation

    def check(self, model: str | None, kind: str = "causal") -> str:
        healthy = self.pool.healthy()
        if not healthy:
            raise ApiError(503, self.pool.summary(), "service_unavailable", code="not_ready",
                           headers={"Retry-After": "1"})
        if self.alias is not None:
            if model is not None and model != self.alias:
                raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.alias!r}",
                               param="model", code="model_not_found")
            return self.alias
        if model is None:
            return healthy[0].target_model or self.name
        if not self.pool.healthy(model):
            served = sorted({m for u in healthy for m in u.model_ids})
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {', '.join(map(repr, served))}",
                           param="model", code="model_not_found")
        return model

    def _route_model(self, requested: str | None) -> str | None:
        """The model an upstream must serve for this request (None: any, with an alias)."""
        return None if self.alias is not None else (requested or self.check(None))

    def count(self, text: str) -> int:
        """Tokens of ``text`` with the local tokenizer; one per character without one (an estimate)."""
        if self.tok is None:
            return len(text)
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def _prompt_tokens(self, body: CompletionRequest | ChatRequest) -> tuple[int, str]:
        if isinstance(body, ChatRequest):
            msgs = [m.for_template() for m in body.messages]
            audit = "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
            if self.tok is not None and getattr(self.tok, "chat_template", None):
                try:
                    text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                    return self.count(text), audit
                except Exception:  # a template that rejects the conversation: the upstream decides
                    pass
            return sum(self.count(m["content"]) + 4 for m in msgs), audit
        prompt = body.prompt
        if isinstance(prompt, str):
            return self.count(prompt), prompt
        import json

        n = sum(len(p) if isinstance(p, list) else (1 if isinstance(p, int) else self.count(p)) for p in prompt)
        return n, json.dumps(prompt, ensure_ascii=False)

    def prepare(self, body: CompletionRequest | ChatRequest) -> GatewayJob:
        chat = isinstance(body, ChatRequest)
        prompt_tokens, audit = self._prompt_tokens(body)
        prompts = 1 if chat or isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else len(body.prompt)
        max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        if max_tokens is None:
            max_tokens = self.st.cfg.max_tokens_default
            ctx = [c.get("max_model_len") for u in self.pool.healthy() for c in u.cards]
            ctx = [c for c in ctx if isinstance(c, int) and c > 0]
            if ctx:  # leave room for the prompt, as a server does when max_tokens is not given
                max_tokens = max(1, min(max_tokens, min(ctx) - prompt_tokens // prompts))
        return GatewayJob(choices=prompts * body.n, prompt_tokens=prompt_tokens * body.n, max_tokens=max_tokens,
                          audit_prompt=audit, body=body, path="/v1/chat/completions" if chat else "/v1/completions",
                          model=self._route_model(body.model), stream=bool(body.stream))

    def start(self, job: GatewayJob, ledger: Ledger):
        gen = GatewayGeneration(self, job, ledger)
        gen.begin()
        return gen

    # ------------------------------------------------------------------ one JSON request, with failover

    async def forward(self, path: str, payload, model: str | None) -> tuple[dict, Upstream]:
        """POST ``payload(upstream)`` to ``path`` on the least busy healthy upstream serving ``model``;
        on a failure before an answer, the next one. Returns (the upstream's JSON answer, the upstream)."""
        import httpx

        tried: set = set()
        reasons: list[Refusal] = []
        while (up := self.pool.pick(model, tried)) is not None:
            tried.add(up)
            try:
                with self.pool.using(up):
                    r = await up.client.post(path, json=payload(up))
                    if r.status_code >= 400:
                        raise refusal(up, r.status_code, r.content, self.pool)
                    obj = r.json()
                    if not isinstance(obj, dict):
                        raise ValueError("the answer is not a JSON object")
            except (httpx.HTTPError, ValueError) as exc:
                why = f"{type(exc).__name__}: {exc}".rstrip(": ")
                if isinstance(exc, httpx.TransportError):
                    self.pool.failed(up, why)
                reasons.append(Refusal(up, why, retry=True))
            except Refusal as exc:
                if not exc.retry:
                    raise exc.error from None
                reasons.append(exc)
            else:
                self.pool.outcomes.labels(up.url, "ok").inc()
                return obj, up
            self.pool.outcomes.labels(up.url, "retried").inc()
        raise self.exhausted(reasons)

    def exhausted(self, reasons: list[Refusal]) -> ApiError:
        """The error when no upstream could serve a request (the reasons stay in metrics, /ready and the log)."""
        if not reasons:
            return ApiError(503, self.pool.summary(), "service_unavailable", code="no_upstream",
                            headers={"Retry-After": "1"})
        if all(r.busy for r in reasons):
            return ApiError(429, "every upstream is busy; retry shortly", "rate_limit_error", code="upstream_busy",
                            headers={"Retry-After": "1"})
        return ApiError(502, f"no upstream could serve the request ({len(reasons)} tried; the last said: "
                             f"{reasons[-1].why[:200]})", "server_error", code="upstream_failed")

    # ------------------------------------------------------------------ the other routes

    async def embed(self, body: EmbeddingRequest) -> tuple[list[dict], int]:
        def payload(up: Upstream) -> dict:
            return {**body.model_dump(exclude_unset=True, exclude_none=True), "model": up.target_model}

        obj, _ = await self.forward("/v1/embeddings", payload, self._route_model(body.model))
        return _data(obj), _prompt_usage(obj)

    async def classify(self, body: ClassificationRequest) -> tuple[list[dict], int]:
        def payload(up: Upstream) -> dict:
            return {**body.model_dump(exclude_unset=True, exclude_none=True), "model": up.target_model}

        obj, _ = await self.forward("/v1/classifications", payload, self._route_model(body.model))
        return _data(obj), _prompt_usage(obj)

    def models(self) -> list[dict]:
        healthy = self.pool.healthy()
        ctx = [c.get("max_model_len") for u in healthy for c in u.cards if isinstance(c.get("max_model_len"), int)]
        if self.alias is not None:
            if not healthy:
                return []
            card = {"id": self.alias, "object": "model", "created": self.st.created, "owned_by": "homeforge"}
            return [card | ({"max_model_len": min(ctx)} if ctx else {})]
        out: dict[str, dict] = {}
        for u in healthy:
            for c in u.cards:
                if isinstance(c.get("id"), str) and c["id"] not in out:
                    card = {"id": c["id"], "object": "model", "created": int(c.get("created") or self.st.created),
                            "owned_by": str(c.get("owned_by") or "upstream")}
                    if isinstance(c.get("max_model_len"), int):
                        card["max_model_len"] = c["max_model_len"]
                    out[c["id"]] = card
        return list(out.values())

    async def reload(self) -> None:
        raise ApiError(400, "reload is not available in gateway mode: reload or restart the upstream servers "
                            "(they leave the pool while down and rejoin when healthy)", code="unsupported")


def _counting_tokenizer(path: Path):
    """The model directory's tokenizer for counting tokens, without importing torch when it is a fast one."""
    if not (path / "tokenizer.json").is_file():
        from homeforge.models.io import load_tokenizer

        return load_tokenizer(path) if (path / "tokenizer_config.json").is_file() else None
    from transformers import PreTrainedTokenizerFast

    from homeforge.security.storage import decrypted_tokenizer_dir

    with decrypted_tokenizer_dir(path) as d:  # an encrypted vocabulary is decrypted to memory only
        return PreTrainedTokenizerFast.from_pretrained(str(d), local_files_only=True)


def _data(obj: dict) -> list[dict]:
    data = obj.get("data")
    if not isinstance(data, list):
        raise ApiError(502, "the upstream's answer has no data list", "server_error", code="upstream_failed")
    return data


def _prompt_usage(obj: dict) -> int:
    use = obj.get("usage") or {}
    n = use.get("prompt_tokens", use.get("total_tokens", 0))
    return int(n) if isinstance(n, int) and n >= 0 else 0
