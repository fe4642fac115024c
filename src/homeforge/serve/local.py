"""``LocalDriver``: the generation driver over the in-process continuous-batching engine.

It tokenizes (prompt strings, token ids, chat templates), checks lengths against the
context, turns a request into one ``GenRequest`` per choice, and forwards the engine's
``Delta``/``Finish`` events (pushed from the engine thread through each request's sink)
to the event loop as ``Piece``/``Done``, filling the ledger on the way.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from homeforge.serve.driver import Done, Job, Ledger, Piece, TokenLogprob
from homeforge.serve.engine import Delta, Finish, GenRequest, NotAccepting, QueueFull
from homeforge.serve.errors import ApiError
from homeforge.serve.protocol import (
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from homeforge.serve.state import ServerState, load_model, make_engine

KINDS = {"causal": "text generation", "classifier": "classification"}


@dataclass
class LocalJob(Job):
    prompts: list[list[int]] = field(default_factory=list)
    body: CompletionRequest | ChatRequest | None = None
    chat: bool = False
    logprobs: int | None = None  # top alternatives asked for; None = no logprobs
    echo: bool = False
    stop: list[str] = field(default_factory=list)
    stop_ids: set[int] = field(default_factory=set)


class LocalDriver:
    def __init__(self, state: ServerState):
        self.st = state

    @property
    def name(self) -> str:
        return self.st.name

    async def startup(self, load: bool = True) -> None:
        st = self.st
        if load and not st.ready:  # the weights load in the background; /health answers meanwhile
            threading.Thread(target=st.load, name="homeforge-load", daemon=True).start()

    async def shutdown(self) -> None:
        st = self.st
        if st.engine is not None:  # graceful: finish what was accepted
            await asyncio.to_thread(st.engine.shutdown, True, st.cfg.graceful_timeout or None)

    # ------------------------------------------------------------------ checks and preparation

    def check(self, model: str | None, kind: str = "causal") -> str:
        st = self.st
        if not st.ready:
            msg = f"the model failed to load: {st.load_error}" if st.load_error else "the model is still loading"
            raise ApiError(503, msg, "service_unavailable", code="not_ready")
        if model is not None and model != st.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {st.name!r}",
                           param="model", code="model_not_found")
        if kind != st.kind:
            raise ApiError(400, f"{st.name!r} is a {st.kind} model and does not support {KINDS[kind]}",
                           param="model", code="unsupported_model")
        return st.name

    def encode(self, prompt, param: str = "prompt") -> list[list[int]]:
        """Token-id lists for a prompt given as text(s) or token ids; an empty one becomes [BOS]."""
        tok = self.st.tok
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        vocab = max(len(tok), self.st.vocab_size)
        out = []
        for p in prompts:
            if isinstance(p, str):
                ids = tok(p)["input_ids"]
            else:
                ids = list(p)
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param=param)
            if not ids:
                ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
            out.append(ids)
        return out

    def _lengths(self, prompts: list[list[int]], max_tokens: int | None) -> int:
        ctx = self.st.max_context
        longest = max(len(p) for p in prompts)
        if longest > ctx:
            raise ApiError(413, f"the prompt has {longest} tokens; this model's context is {ctx} tokens",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            return max(0, min(self.st.cfg.max_tokens_default, ctx - longest))
        if longest + max_tokens > ctx:
            raise ApiError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                                f"{ctx} tokens; lower max_tokens to at most {ctx - longest}",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def _chat_ids(self, body: ChatRequest) -> tuple[list[int], str]:
        tok = self.st.tok
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, f"{self.st.name!r} has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        msgs = [m.for_template() for m in body.messages]
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template that rejects this conversation (e.g. role order)
            raise ApiError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        audit = "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
        return tok(text, add_special_tokens=False)["input_ids"], audit

    def prepare(self, body: CompletionRequest | ChatRequest) -> LocalJob:
        chat = isinstance(body, ChatRequest)
        if chat:
            ids, audit = self._chat_ids(body)
            prompts, max_tokens = [ids], body.max_completion_tokens or body.max_tokens
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            echo = False
        else:
            prompts, max_tokens = self.encode(body.prompt), body.max_tokens
            audit = body.prompt if isinstance(body.prompt, str) else json.dumps(body.prompt)
            logprobs, echo = body.logprobs, body.echo
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return LocalJob(choices=len(prompts) * body.n, prompt_tokens=sum(len(p) for p in prompts) * body.n,
                        max_tokens=self._lengths(prompts, max_tokens), audit_prompt=audit, prompts=prompts,
                        body=body, chat=chat, logprobs=logprobs, echo=echo, stop=stop,
                        stop_ids=set() if body.ignore_eos else self.st.stop_ids(chat))

    def start(self, job: LocalJob, ledger: Ledger) -> LocalGeneration:
        gen = LocalGeneration(self.st, job, ledger, asyncio.get_running_loop())
        try:
            gen.engine.submit(gen.reqs)  # the engine of the version current now: the whole response comes from it
        except QueueFull as exc:
            self.st.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"{exc}; retry shortly", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except NotAccepting as exc:
            raise ApiError(503, str(exc), "service_unavailable", code="shutting_down") from None
        return gen

    # ------------------------------------------------------------------ the other routes

    async def embed(self, body: EmbeddingRequest) -> tuple[list[dict], int]:
        st = self.st
        prompts = self.encode(body.input, "input")
        if max(len(p) for p in prompts) > st.max_context:
            raise ApiError(413, f"an input is longer than the context of {st.max_context} tokens", param="input",
                           code="context_length_exceeded")
        if st.model is None:
            raise ApiError(400, f"embeddings need the PyTorch backend (this server runs {st.cfg.backend})",
                           code="unsupported_backend")
        if st.engine is not None:  # on the engine thread, between two decode steps
            vecs = await asyncio.wrap_future(st.engine.call(lambda: _embed(st.model, prompts)))
        else:
            vecs = await asyncio.to_thread(_locked, st._cls_lock, _embed, st.model, prompts)
        data = []
        for i, v in enumerate(vecs):
            emb = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() \
                if body.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return data, sum(len(p) for p in prompts)

    async def classify(self, body: ClassificationRequest) -> tuple[list[dict], int]:
        st = self.st
        texts = [body.input] if isinstance(body.input, str) else body.input
        meta = getattr(st.model, "homeforge_vision", None)
        if meta is not None:
            return await asyncio.to_thread(_locked, st._cls_lock, _classify_vision, st.model, meta, st.tok, body, texts)
        if body.image is not None:
            raise ApiError(400, f"{st.name!r} is a text classifier: send `input`, not `image`", param="image",
                           code="unsupported_input")
        if texts is None:
            raise ApiError(400, "send `input`: the texts to classify", param="input")
        return await asyncio.to_thread(_locked, st._cls_lock, _classify, st.model, st.tok, texts, st.max_context)

    def models(self) -> list[dict]:
        st = self.st
        if not st.ready:
            return []
        card = {"id": st.name, "object": "model", "created": st.created, "owned_by": "homeforge",
                "max_model_len": st.max_context}
        return [{**card, "version": st.version} if st.version else card]

    async def reload(self) -> None:
        st = self.st
        self.check(None, st.kind)
        if st.follow is not None:  # registry:NAME@ALIAS: whatever the alias names now, swapped in beside the old
            await self.swap_to_alias(force=True)
            return
        if st.engine is None:
            raise ApiError(400, "reload is supported for generative models only", code="unsupported_model")
        kind, model, tok, backend = await asyncio.to_thread(load_model, st.cfg)

        def swap():
            st.engine.backend, st.model, st.tok = backend, model, tok
            st.engine.tok = copy.deepcopy(tok)

        await asyncio.wrap_future(st.engine.call(swap, when_idle=True))


    async def swap_to_alias(self, force: bool = False) -> bool:
        """Serve the version the followed alias names now: load it beside the current one, send new requests to
        it, let the old engine finish what it accepted, then free it. False when nothing changed."""
        st = self.st
        async with st.swap_lock:
            target = await asyncio.to_thread(st.follow.current)
            if target is None or (target.label == st.version and not force):
                return False
            cfg = st.cfg.model_copy(update={"model_dir": str(target.path)})
            kind, model, tok, backend = await asyncio.to_thread(load_model, cfg)
            if kind != st.kind or backend is None:
                raise ApiError(409, f"{target.label} is a {kind} model; this server serves a {st.kind} model",
                               code="unsupported_model")
            engine = make_engine(cfg, backend, copy.deepcopy(tok)).start()  # as at startup (lean where it can)
            old, was = st.engine, st.version
            st.engine, st.model, st.tok, st.version, st.cfg = engine, model, tok, target.label, cfg  # one step
            st.swaps.append({"from": was, "to": target.label, "time": time.time()})
        if old is not None:  # requests in flight (and queued) on the old version finish there
            await asyncio.to_thread(old.shutdown, True, st.cfg.graceful_timeout or None)
        return True


class LocalGeneration:
    """One request's choices on the engine: the sinks feed the ledger and an asyncio queue."""

    def __init__(self, st: ServerState, job: LocalJob, ledger: Ledger, loop: asyncio.AbstractEventLoop):
        self.st, self.job, self.ledger, self.loop = st, job, ledger, loop
        self.engine, self.tok, self.version = st.engine, st.tok, st.version  # one version for the whole request
        self.queue: asyncio.Queue = asyncio.Queue()
        body = job.body
        echo_lp = job.echo and job.logprobs is not None
        self.reqs = []
        for pi, ids in enumerate(job.prompts):
            for j in range(body.n):
                self.reqs.append(GenRequest(
                    ids, job.max_tokens, self._sink(pi * body.n + j), temperature=body.temperature,
                    top_p=body.top_p, top_k=max(body.top_k, 0), seed=None if body.seed is None else body.seed + j,
                    stop=job.stop, stop_ids=job.stop_ids, logprobs=job.logprobs, echo_logprobs=echo_lp))

    def _sink(self, i: int) -> Callable[[object], None]:
        ledger, queue, loop = self.ledger, self.queue, self.loop

        def sink(ev) -> None:  # on the engine thread
            if isinstance(ev, Finish):
                ledger.finish(i, ev.reason, ev.completion_tokens)
            elif isinstance(ev, Delta) and not ev.prompt:
                ledger.token(i, ev.text, len(ev.tokens))
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (i, ev))
            except RuntimeError:  # the event loop is gone (server stopping)
                pass

        return sink

    async def opened(self) -> None:
        """The engine accepted the request when ``submit`` returned."""

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancel()

    async def events(self, gone: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Piece | Done]:
        job, tok = self.job, self.tok
        if job.echo and job.logprobs is None:  # with logprobs the engine scores and sends the prompt
            for i, r in enumerate(self.reqs):
                yield Piece(i, tok.decode(r.prompt_ids), prompt=True)
        left, checked = len(self.reqs), time.monotonic()
        while left:
            try:
                i, ev = await asyncio.wait_for(self.queue.get(), 0.5)
            except asyncio.TimeoutError:
                ev = None
            if gone is not None and time.monotonic() - checked > 0.5:  # also while tokens keep coming
                checked = time.monotonic()
                if await gone():
                    return
            if isinstance(ev, Finish):
                left -= 1
                yield Done(i, ev.reason, ev.error)
            elif isinstance(ev, Delta):
                lp = self._logprobs(ev.tokens) if job.logprobs is not None else None
                if ev.text or lp:
                    yield Piece(i, ev.text, lp, prompt=ev.prompt)

    def _logprobs(self, infos) -> list[TokenLogprob]:
        dec = self.tok.decode
        return [TokenLogprob(t.text, t.logprob, None if t.top is None else [(dec([k]), v) for k, v in t.top.items()])
                for t in infos]


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


def _classify_vision(model, meta, tok, body, texts):
    from homeforge.vision.infer import BadRequest, classify

    images = [body.image] if isinstance(body.image, str) else body.image
    try:
        return classify(model, meta, tok, images, texts)
    except BadRequest as exc:
        raise ApiError(400, str(exc), param=exc.param, code="invalid_input") from None


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
