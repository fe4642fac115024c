"""Continuous (iteration-level) batching over a KV cache, for Hugging Face causal LMs.

One engine thread owns the model. Between two decode steps it admits waiting requests
(each is prefilled on its own, then its KV cache joins the running batch, left-padded to
the batch's cache length) and drops the rows that finished or whose client went away.
Every decode step runs one forward pass over all running rows with per-row position ids
and a padding mask, so a row's tokens are the same as when it runs alone (padding is
masked to exactly zero attention weight; only float reduction order differs).

Results are pushed to a per-request ``sink`` callable from the engine thread; the HTTP
layer forwards them to its event loop.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from homeforge.errors import HomeforgeError


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


class NotAccepting(Exception):
    """The engine is shutting down or not started (HTTP 503)."""


@dataclass
class TokenInfo:
    """One token with its log-probability and the top alternatives (only when asked)."""

    id: int
    text: str
    logprob: float | None
    top: dict[int, float] | None = None


@dataclass
class Delta:
    """New text for a sequence. ``tokens`` are the tokens that produced it."""

    text: str
    tokens: list[TokenInfo]
    prompt: bool = False  # the scored prompt (echo with logprobs), sent once before any generated token


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class GenRequest:
    """A single sequence to generate. ``n`` choices are ``n`` requests."""

    prompt_ids: list[int]
    max_tokens: int
    sink: Callable[[object], None]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_ids: set[int] = field(default_factory=set)
    logprobs: int | None = None  # number of top alternatives; None = no logprobs
    echo_logprobs: bool = False  # also score the prompt tokens (for echo)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    # engine state
    _gen: torch.Generator | None = None
    _out_ids: list[int] = field(default_factory=list)
    _emitted: int = 0  # characters of text already sent
    _pos: int = 0  # next position id

    def cancel(self) -> None:
        self.cancelled = True


class Backend:
    """What the engine needs from a model: one forward over a cache, and a fresh cache."""

    max_context: int
    vocab_size: int

    def forward(self, input_ids, position_ids, attention_mask, cache, last_only: bool = False):
        """-> (logits [B, T, V] (T = 1 with ``last_only``), cache)."""
        raise NotImplementedError


class TorchBackend(Backend):
    """A transformers causal LM with a ``DynamicCache``."""

    def __init__(self, model):
        import inspect

        from transformers import DynamicCache

        self.model = model
        self._cache_cls = DynamicCache
        # transformers renamed ``past_key_values`` to ``cache`` (the old name warns, then goes away)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cfg = model.config
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.vocab_size = int(cfg.vocab_size)
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and \
                getattr(cfg, "layer_types", None) and "sliding_attention" in cfg.layer_types:
            raise HomeforgeError("sliding-window attention models are not supported by the PyTorch serving engine",
                                 fix="serve this model with the vLLM backend (--backend vllm) on a GPU")

    def new_cache(self):
        return self._cache_cls(config=self.model.config)

    @torch.inference_mode()
    def forward(self, input_ids, position_ids, attention_mask, cache, last_only: bool = False):
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=True, logits_to_keep=1 if last_only else 0, **{self._cache_kw: cache})
        return out.logits.float(), getattr(out, self._cache_kw)


def _layers(cache):
    return cache.layers


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad a [B, H, T, D] tensor with zeros on T up to ``length``."""
    missing = length - t.shape[-2]
    if missing <= 0:
        return t
    pad = t.new_zeros(*t.shape[:-2], missing, t.shape[-1])
    return torch.cat([pad, t], dim=-2)


def sample(logits: torch.Tensor, req: GenRequest) -> int:
    """Pick the next token from one row of logits [V] under the request's settings."""
    if req.temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits / req.temperature
    if req.top_k and req.top_k < scores.shape[-1]:
        kth = torch.topk(scores, req.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if req.top_p < 1.0:
        sorted_scores, idx = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        drop = (cum - probs) > req.top_p  # keep the smallest set whose mass reaches top_p
        sorted_scores = sorted_scores.masked_fill(drop, -math.inf)
        scores = torch.full_like(scores, -math.inf).scatter(0, idx, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=req._gen))


class Engine:
    """Continuous batching engine. ``start()`` launches the engine thread."""

    def __init__(self, backend: Backend, tokenizer, *, max_batch_size: int = 16, max_queue: int = 64,
                 max_context: int | None = None, on_step: Callable[[int, int], None] | None = None):
        self.backend = backend
        self.tok = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_context = min(max_context or backend.max_context, backend.max_context)
        self.on_step = on_step  # (batch size, queue depth) after each step, for metrics
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.running: list[GenRequest] = []
        self.jobs: collections.deque = collections.deque()
        self.idle_jobs: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._accepting = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 = real token
        self.steps = 0
        self.max_batch_seen = 0

    # ------------------------------------------------------------------ public API

    def start(self) -> Engine:
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="homeforge-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    def submit(self, reqs: list[GenRequest]) -> None:
        """Queue requests (all or none). Raises QueueFull or NotAccepting."""
        with self._cv:
            if not self._accepting:
                raise NotAccepting("the server is shutting down")
            if len(self.waiting) + len(reqs) > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            for r in reqs:
                r._gen = torch.Generator().manual_seed(r.seed % 2**63) if r.seed is not None else None
                if r._gen is None and r.temperature > 0:
                    r._gen = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(8), "little") >> 1)
                self.waiting.append(r)
            self._cv.notify()

    def call(self, fn: Callable[[], object], when_idle: bool = False) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between two steps (model access without races).

        With ``when_idle`` admission pauses and ``fn`` runs once the running batch is empty
        (a model swap must not mix weights inside one sequence); queued requests then go on.
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if not self._accepting:
                raise NotAccepting("the server is shutting down")
            (self.idle_jobs if when_idle else self.jobs).append((fn, fut))
            self._cv.notify()
        return fut

    def queue_depth(self) -> int:
        return len(self.waiting)

    def batch_size(self) -> int:
        return len(self.running)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with ``drain`` finish every queued and running request first."""
        with self._cv:
            self._accepting = False
            if not drain:
                for r in list(self.waiting) + self.running:
                    r.cancel()
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self.waiting or self.running or self.jobs or self.idle_jobs or self._stop):
                    self._cv.wait(0.5)
                if self._stop and not (self.waiting or self.running or self.jobs or self.idle_jobs):
                    return
                jobs = list(self.jobs)
                self.jobs.clear()
                if self.idle_jobs and not self.running:
                    jobs += list(self.idle_jobs)
                    self.idle_jobs.clear()
                pause = bool(self.idle_jobs)
            for fn, fut in jobs:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(exc)
            try:
                if not pause:
                    self._admit()
                if self.running:
                    self._decode_step()
            except Exception as exc:  # never let one bad step kill the engine: fail the rows in flight
                for r in self.running:
                    self._finish(r, "error", error=f"{type(exc).__name__}: {exc}")
                self.running, self._cache, self._mask = [], None, None
            if self.on_step:
                self.on_step(len(self.running), len(self.waiting))

    def _finish(self, req: GenRequest, reason: str, error: str | None = None) -> None:
        try:
            req.sink(Finish(reason, len(req.prompt_ids), len(req._out_ids), error))
        except Exception:  # a sink whose consumer is gone must not break the engine
            pass

    def _admit(self) -> None:
        while len(self.running) < self.max_batch_size:
            with self._cv:
                if not self.waiting:
                    return
                req = self.waiting.popleft()
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            try:
                self._prefill(req)
            except Exception as exc:  # this request fails alone; the running batch is untouched
                self._finish(req, "error", error=f"{type(exc).__name__}: {exc}")

    def _prefill(self, req: GenRequest) -> None:
        ids = torch.tensor([req.prompt_ids], dtype=torch.long)
        n = ids.shape[1]
        cache = self.backend.new_cache()
        logits, cache = self.backend.forward(ids, torch.arange(n).unsqueeze(0), torch.ones_like(ids), cache,
                                             last_only=not req.echo_logprobs)  # skip the LM head elsewhere
        logits = logits[0]
        req._pos = n
        if req.echo_logprobs:
            self._emit_prompt_logprobs(req, logits)
        if req.max_tokens == 0:
            self._finish(req, "length")
            return
        if self._take(req, logits[-1]):
            return  # finished on its first token: never joins the batch
        self._join(req, cache)

    def _emit_prompt_logprobs(self, req: GenRequest, logits: torch.Tensor) -> None:
        """Score every prompt token given the ones before it (the first has no score)."""
        lp = torch.log_softmax(logits[:-1], dim=-1)
        ids = req.prompt_ids
        infos = [TokenInfo(ids[0], self.tok.decode([ids[0]]), None, None if not req.logprobs else {})]
        for i in range(1, len(ids)):
            row = lp[i - 1]
            top = None
            if req.logprobs:
                v, ix = torch.topk(row, req.logprobs)
                top = {int(a): float(b) for a, b in zip(ix, v, strict=False)}
            infos.append(TokenInfo(ids[i], self.tok.decode([ids[i]]), float(row[ids[i]]), top))
        req.sink(Delta(self.tok.decode(ids), infos, prompt=True))

    def _join(self, req: GenRequest, cache) -> None:
        n = cache.get_seq_length()
        if not self.running:
            self._cache, self._mask = cache, torch.ones(1, n, dtype=torch.long)
            self.running = [req]
            return
        length = max(n, self._mask.shape[1])
        for mine, new in zip(_layers(self._cache), _layers(cache), strict=False):
            mine.keys = torch.cat([_left_pad(mine.keys, length), _left_pad(new.keys, length)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, length), _left_pad(new.values, length)], dim=0)
        pad_old = length - self._mask.shape[1]
        old = torch.cat([self._mask.new_zeros(self._mask.shape[0], pad_old), self._mask], dim=1)
        new_row = torch.cat([torch.zeros(1, length - n, dtype=torch.long), torch.ones(1, n, dtype=torch.long)], dim=1)
        self._mask = torch.cat([old, new_row], dim=0)
        self.running.append(req)
        self.max_batch_seen = max(self.max_batch_seen, len(self.running))

    def _decode_step(self) -> None:
        keep = [i for i, r in enumerate(self.running) if not r.cancelled]
        if len(keep) < len(self.running):
            for r in self.running:
                if r.cancelled:
                    self._finish(r, "cancelled")
            self._select(keep)
            if not self.running:
                return
        ids = torch.tensor([[r._out_ids[-1]] for r in self.running], dtype=torch.long)
        pos = torch.tensor([[r._pos] for r in self.running], dtype=torch.long)
        mask = torch.cat([self._mask, self._mask.new_ones(len(self.running), 1)], dim=1)
        logits, self._cache = self.backend.forward(ids, pos, mask, self._cache)
        self._mask = mask
        self.steps += 1
        keep = []
        for i, r in enumerate(self.running):
            r._pos += 1
            if not self._take(r, logits[i, -1]):
                keep.append(i)
        if len(keep) < len(self.running):
            self._select(keep)

    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; drop cache columns that are padding in every remaining row."""
        self.running = [self.running[i] for i in keep]
        if not self.running:
            self._cache, self._mask = None, None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        mask = self._mask[idx]
        first = int(mask.any(dim=0).nonzero()[0])
        for layer in _layers(self._cache):
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]
        self._mask = mask[:, first:]

    def _take(self, req: GenRequest, logits: torch.Tensor) -> bool:
        """Sample the next token for ``req``, stream it; True when the request is finished."""
        tok = sample(logits, req)
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        info_lp = None
        top = None
        if req.logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            info_lp = float(lp[tok])
            if req.logprobs:
                v, ix = torch.topk(lp, req.logprobs)
                top = {int(a): float(b) for a, b in zip(ix, v, strict=False)}
        if tok in req.stop_ids:
            self._flush(req, final=True)
            self._finish(req, "stop")
            return True
        req._out_ids.append(tok)
        info = TokenInfo(tok, self.tok.decode([tok]) if req.logprobs is not None else "", info_lp, top)
        stopped = self._flush(req, final=False, new=info)
        if stopped:
            self._finish(req, "stop")
            return True
        if len(req._out_ids) >= req.max_tokens or req._pos + 1 >= self.max_context:
            self._flush(req, final=True)
            self._finish(req, "length")
            return True
        return False

    def _flush(self, req: GenRequest, final: bool, new: TokenInfo | None = None) -> bool:
        """Send the text that is safe to send; True if a stop string was hit."""
        text = self.tok.decode(req._out_ids, skip_special_tokens=True)
        for s in req.stop:
            at = text.find(s)
            if at != -1:
                if at > req._emitted or new is not None:
                    req.sink(Delta(text[req._emitted:at], [new] if new else []))
                req._emitted = at
                return True
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                safe = len(text.rstrip("\ufffd"))
            for s in req.stop:  # hold back a suffix that could still become a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        if safe > req._emitted or new is not None:
            req.sink(Delta(text[req._emitted:max(safe, req._emitted)], [new] if new else []))
            req._emitted = max(safe, req._emitted)
        return False
