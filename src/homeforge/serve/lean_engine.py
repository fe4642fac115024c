"""The lean engine: continuous batching over ``lean.SlotLM`` (slot KV cache), with batched and
chunked prefill and a prefix cache. See ``lean`` for the forward and docs/serving.md for
what each part buys.
"""

from __future__ import annotations

import collections

import torch

from homeforge.serve.engine import Engine, GenRequest
from homeforge.serve.lean import SlotLM

# --------------------------------------------------------------------------- prefix cache


class PrefixCache:
    """Keys/values of recent prompts, LRU within ``tokens``; a new prompt reuses its longest shared head.

    A chat template's system head (or any repeated prompt start) is then computed once:
    the prefill starts after the reused positions. At least the prompt's last token is
    always recomputed, since its logits pick the first new token.
    """

    MIN = 4  # shorter shared heads are not worth the copy

    def __init__(self, tokens: int):
        self.budget = tokens
        self.entries: collections.OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = \
            collections.OrderedDict()
        self.size = 0
        self.hits = 0
        self.reused = 0  # prompt tokens not recomputed

    def match(self, ids: list[int]) -> int:
        """How many leading positions of ``ids`` ``load`` would fill (0 below ``MIN``)."""
        return self._best(ids)[0]

    def _best(self, ids: list[int]) -> tuple[int, tuple | None]:
        best, key = 0, None
        for k in self.entries:
            n = min(len(k), len(ids) - 1)
            i = 0
            while i < n and k[i] == ids[i]:
                i += 1
            if i > best:
                best, key = i, k
        return (best, key) if best >= self.MIN else (0, None)

    def load(self, lm: SlotLM, slot: int, ids: list[int]) -> int:
        """Put the longest cached head of ``ids`` into ``slot``; -> the number of positions filled."""
        best, key = self._best(ids)
        if not best:
            return 0
        keys, values = self.entries[key]
        self.entries.move_to_end(key)
        lm.load(slot, keys[..., :best, :], values[..., :best, :])
        self.hits += 1
        self.reused += best
        return best

    def store(self, lm: SlotLM, slot: int, ids: list[int]) -> None:
        key = tuple(ids)
        if len(key) < self.MIN or len(key) > self.budget:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        self.entries[key] = lm.save(slot, len(key))
        self.size += len(key)
        while self.size > self.budget:
            old, _ = self.entries.popitem(last=False)
            self.size -= len(old)


# --------------------------------------------------------------------------- the engine over slots


class SlotEngine(Engine):
    """The continuous-batching engine on the lean path: slot KV cache, chunked prefill, prefix cache.

    Between two decode steps it spends at most ``prefill_chunk`` prompt tokens on waiting
    requests (a long prompt is split over several steps, so running streams keep flowing
    while a new one is prefilled); the request being prefilled lives in the spare slot
    (index ``max_batch_size``) and moves into the batch once its first token is picked.
    """

    def __init__(self, backend, tokenizer, *, prefill_chunk: int = 256, prefix_cache_tokens: int = 1024, **kw):
        super().__init__(backend, tokenizer, **kw)
        self.prefill_chunk = max(1, prefill_chunk)
        self.prefix = PrefixCache(prefix_cache_tokens)
        self._lm: SlotLM | None = None
        self._pre: GenRequest | None = None  # the request being prefilled (in the spare slot)
        self._pre_done = 0  # its prompt positions already in the cache
        self._solo = 0  # the next requests are prefilled one by one (after a batched prefill failed)

    @property
    def lm(self) -> SlotLM:
        if self._lm is None or self._lm.model is not self.backend.model:  # built lazily; rebuilt after a reload
            self._lm = SlotLM(self.backend.model, self.max_batch_size + 1)
            self.prefix = PrefixCache(self.prefix.budget)
        return self._lm

    GROUP_TOKENS = 4096  # padded prompt tokens of one batched prefill

    def _admit(self) -> None:
        # prompt tokens to spend before the next decode step: a burst of arrivals is spread over a few
        # steps, so first tokens come out early and the batch does not finish (and re-fill) in lockstep
        budget = self.prefill_chunk
        while budget > 0:
            if self._pre is None:
                free = self.max_batch_size - len(self.running)
                if free <= 0:
                    return
                group = self._group(free, budget)
                if group:  # short plain prompts: prefilled together, straight into their batch rows
                    budget -= self._prefill_group(group)
                    continue
                with self._cv:
                    if not self.waiting:
                        return
                    req = self.waiting.popleft()
                self._solo = max(0, self._solo - 1)
                if req.cancelled:
                    self._finish(req, "cancelled")
                    continue
                self._pre = req  # one prompt through the spare slot: long (chunked), echo, or a cached head
                self._pre_done = 0 if req.echo_logprobs else self.prefix.load(self.lm, self.max_batch_size,
                                                                               req.prompt_ids)
            req = self._pre
            if req.cancelled:
                self._pre = None
                self._finish(req, "cancelled")
                continue
            try:
                budget -= self._prefill_some(req, budget)
            except Exception as exc:  # this request fails alone; the running batch is untouched
                self._pre = None
                self._finish(req, "error", error=f"{type(exc).__name__}: {exc}")

    def _group(self, free: int, budget: int) -> list[GenRequest]:
        """Waiting requests, in order, that can be prefilled together now."""
        group, cancelled, longest = [], [], 0
        with self._cv:
            while self.waiting and len(group) < free and not self._solo:
                r = self.waiting[0]
                if r.cancelled:
                    cancelled.append(self.waiting.popleft())
                    continue
                n = len(r.prompt_ids)
                width = max(longest, n) * (len(group) + 1)
                if r.echo_logprobs or self.prefix.match(r.prompt_ids) or width > min(budget, self.GROUP_TOKENS):
                    break
                group.append(self.waiting.popleft())
                longest = max(longest, n)
        for r in cancelled:
            self._finish(r, "cancelled")
        return group

    def _prefill_group(self, group: list[GenRequest]) -> int:
        base = len(self.running)
        try:
            logits = self.lm.prefill_rows(base, [r.prompt_ids for r in group])
        except Exception:  # run them one by one, so that only a request that fails alone fails
            with self._cv:
                self.waiting.extendleft(reversed(group))
            self._solo = len(group)
            return 0
        keep = list(range(base))
        for j, r in enumerate(group):
            r._pos = len(r.prompt_ids)
            self.prefix.store(self.lm, base + j, r.prompt_ids)
            if r.max_tokens == 0:
                self._finish(r, "length")
            elif not self._take(r, logits[j]):
                keep.append(base + j)
        self.running = self.running + group
        if len(keep) < len(self.running):
            self._select(keep)
        self.max_batch_seen = max(self.max_batch_seen, len(self.running))
        return max(len(r.prompt_ids) for r in group) * len(group)

    def _prefill_some(self, req: GenRequest, budget: int) -> int:
        """Prefill the next chunk of ``req``'s prompt; when complete, pick its first token and join."""
        ids, start, spare = req.prompt_ids, self._pre_done, self.max_batch_size
        # nothing to interleave with (or prompt scoring, which needs every position's logits): all at once
        end = len(ids) if (not self.running or req.echo_logprobs) else min(len(ids), start + budget)
        logits = self.lm.prefill(spare, ids[start:end], start, last_only=not req.echo_logprobs)
        self._pre_done = end
        if end < len(ids):
            return end - start
        self._pre = None
        req._pos = len(ids)
        self.prefix.store(self.lm, spare, ids)
        if req.echo_logprobs:
            self._emit_prompt_logprobs(req, logits)
        if req.max_tokens == 0:
            self._finish(req, "length")
        elif not self._take(req, logits[-1]):  # not finished on its first token: join the batch
            self.lm.move(spare, len(self.running), len(ids))
            self.running.append(req)
            self.max_batch_seen = max(self.max_batch_seen, len(self.running))
        return end - start

    def _decode_step(self) -> None:
        if any(r.cancelled for r in self.running):
            for r in self.running:
                if r.cancelled:
                    self._finish(r, "cancelled")
            self._select([i for i, r in enumerate(self.running) if not r.cancelled])
            if not self.running:
                return
        logits = self.lm.decode([r._out_ids[-1] for r in self.running], [r._pos for r in self.running])
        self.steps += 1
        keep = []
        for i, r in enumerate(self.running):
            r._pos += 1
            if not self._take(r, logits[i]):
                keep.append(i)
        if len(keep) < len(self.running):
            self._select(keep)

    def _select(self, keep: list[int]) -> None:
        """Keep rows ``keep``: the last surviving rows move into the holes the others leave."""
        rows, n = self.running, len(keep)
        kept = set(keep)
        new = [rows[i] if i in kept else None for i in range(n)]
        movers = [i for i in keep if i >= n]
        for hole, src in zip([i for i in range(n) if i not in kept], movers, strict=True):
            self.lm.move(src, hole, rows[src]._pos)
            new[hole] = rows[src]
        self.running = new
