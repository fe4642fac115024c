"""A lean decode path for Llama-family models over a preallocated slot KV cache.

The generic path (``engine.TorchBackend``) runs the transformers model with a growing
``DynamicCache`` that the engine left-pads on every join, and the model builds a 4-D mask
through ``transformers.masking_utils`` on every step. Here the engine owns one KV tensor
per model, ``[layers, slots, kv_heads, capacity, head_dim]``, preallocated and grown by
doubling; a running sequence lives in one slot (row ``i`` of the batch is slot ``i``) and
writes its new key/value at its own position, so joining, leaving and decoding never copy
the cache (only a leaving row's hole is filled by moving the last row into it). The
forward calls the model's own modules (norms, projections, rotary embedding, MLP), so
int8 dynamic-quantized linears work unchanged, and runs attention with
``scaled_dot_product_attention`` over the slots' views with a boolean length mask built
in one op. Greedy tokens equal transformers' ``generate`` (tested on Llama and Qwen2, fp32
and int8).

Supported: decoder-only Llama, Mistral (without sliding window), Qwen2 and Qwen3 layouts;
anything else keeps the generic path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from homeforge.serve.engine import Engine, GenRequest

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}


def supports(model) -> bool:
    """True when ``model`` is a causal LM whose layers this module can run directly."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
        types = getattr(cfg, "layer_types", None) or []
        if cfg.model_type == "mistral" or "sliding_attention" in types:
            return False
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    layer = base.layers[0]
    attn = getattr(layer, "self_attn", None)
    return all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")) and \
        all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp"))


def _fuse(layer):
    """One weight for q/k/v and one for gate/up, when they are plain linears (not quantized).

    The modules' own weights become views of the fused ones, so memory does not grow and
    the transformers model (used for embeddings and the generic path) stays intact.
    """
    a, mlp = layer.self_attn, layer.mlp
    lins = [a.q_proj, a.k_proj, a.v_proj]
    mlp_lins = [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)]
    if not all(type(m) is torch.nn.Linear for m in lins + mlp_lins) or not hasattr(mlp, "act_fn"):
        return None
    with torch.no_grad():
        sizes = [m.out_features for m in lins]
        out = []
        for group in (lins, mlp_lins):
            w = torch.cat([m.weight for m in group])
            b = torch.cat([m.bias for m in group]) if all(m.bias is not None for m in group) else None
            if b is None and any(m.bias is not None for m in group):
                return None
            at = 0
            for m in group:
                n = m.out_features
                m.weight.data = w[at:at + n]
                if b is not None:
                    m.bias.data = b[at:at + n]
                at += n
            out += [w, b]
    return out[0], out[1], sizes, out[2], out[3], mlp.act_fn


class _Packed:
    """A linear whose weight oneDNN has reordered once for its blocked kernels.

    Measured on the 2-core CPU here (SmolLM2-135M shapes, fp32): 2.0-3.3x faster than
    ``F.linear`` (MKL) at 16-60 rows, about equal at 1 row, for the same fp32 math (the
    results differ from MKL's only in summation order). The reordered copy costs the
    memory of the weight once more.
    """

    __slots__ = ("w", "b")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
        self.w = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        self.b = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.w, self.b, "none", [], "")
        return y.view(*shape[:-1], y.shape[-1])


def _packable(*mods) -> bool:
    return all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in mods) and \
        torch.backends.mkldnn.is_available()


def _linear(weight, bias, pack: bool, rows: int):
    if pack:
        try:
            return _Packed(weight, bias, rows)
        except (RuntimeError, AttributeError):  # no oneDNN in this torch build: plain linear
            pass
    return lambda x: F.linear(x, weight, bias)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class SlotLM:
    """The model's forward over a slot KV cache. Not thread-safe: one engine thread owns it."""

    def __init__(self, model, slots: int, capacity: int = 128, packed: bool = True):
        self.model = model
        cfg = model.config
        base = model.model
        self.embed, self.layers, self.norm, self.rotary = base.embed_tokens, list(base.layers), base.norm, base.rotary_emb
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads or cfg.num_attention_heads)
        self.qk_norm = hasattr(attn, "q_norm")
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.vocab_size = int(cfg.vocab_size)
        self.dtype = self.embed.weight.dtype
        self.fused = [_fuse(layer) for layer in self.layers]
        # per layer: q/k/v, o, gate/up, down as callables (oneDNN-packed where possible), or None for the modules
        self.mats: list = []
        for layer, fused in zip(self.layers, self.fused, strict=True):
            a, mlp = layer.self_attn, layer.mlp
            if fused is None:
                self.mats.append(None)
                continue
            pack = packed and _packable(a.o_proj, mlp.down_proj)
            self.mats.append((_linear(fused[0], fused[1], pack, slots), _linear(a.o_proj.weight, a.o_proj.bias, pack, slots),
                              _linear(fused[3], fused[4], pack, slots),
                              _linear(mlp.down_proj.weight, mlp.down_proj.bias, pack, slots)))
        head = self.lm_head
        self.head = _linear(head.weight, head.bias, packed and _packable(head), slots) \
            if type(head) is torch.nn.Linear else head
        self.slots = slots
        self.capacity = 0
        self.k = self.v = torch.empty(0)
        self.reserve(min(capacity, self.max_context))

    # ------------------------------------------------------------------ cache

    @torch.inference_mode()
    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions per slot (doubling, up to the context)."""
        if length <= self.capacity:
            return
        cap = max(self.capacity, 16)
        while cap < length:
            cap *= 2
        cap = min(cap, self.max_context)
        shape = (len(self.layers), self.slots, self.kv_heads, cap, self.head_dim)
        k, v = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
        if self.capacity:
            k[..., :self.capacity, :] = self.k
            v[..., :self.capacity, :] = self.v
        self.k, self.v, self.capacity = k, v, cap

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (every layer at once)."""
        if src != dst and length:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    @torch.inference_mode()
    def load(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put saved ``[layers, kv_heads, n, head_dim]`` keys/values at positions 0..n-1 of ``slot``."""
        n = keys.shape[-2]
        self.reserve(n)
        self.k[:, slot, :, :n] = keys
        self.v[:, slot, :, :n] = values

    @torch.inference_mode()
    def save(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, slot, :, :length].clone(), self.v[:, slot, :, :length].clone()

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], start: int, last_only: bool = True) -> torch.Tensor:
        """Run ``ids`` at positions ``start..`` of ``slot`` (after ``start`` cached ones) -> logits [T or 1, V]."""
        t = len(ids)
        end = start + t
        self.reserve(end)
        x = self.embed(torch.tensor([ids]))
        pos = torch.arange(start, end).unsqueeze(0)
        mask = None
        if start:  # query i sees keys 0..start+i
            mask = (torch.arange(end).unsqueeze(0) <= pos.transpose(0, 1)).view(1, 1, t, end)

        def write(cache, i, new):
            cache[i, slot, :, start:end] = new[0]
            return cache[i, slot:slot + 1, :, :end]

        return self._run(x, pos, write, mask, causal=not start, last_only=last_only)[0]

    @torch.inference_mode()
    def prefill_rows(self, base: int, prompts: list[list[int]]) -> torch.Tensor:
        """Prompts (from position 0) into slots ``base..`` in one batched pass -> last-token logits [k, V].

        Right-padded to the longest: with causal attention a real token never sees the padding
        after it, and the padding's cache entries are overwritten by the decode steps.
        """
        k, t = len(prompts), max(len(p) for p in prompts)
        self.reserve(t)
        x = self.embed(torch.tensor([p + [0] * (t - len(p)) for p in prompts]))
        pos = torch.arange(t).unsqueeze(0).expand(k, t)

        def write(cache, i, new):
            cache[i, base:base + k, :, :t] = new
            return cache[i, base:base + k, :, :t]

        pick = torch.tensor([len(p) - 1 for p in prompts])
        return self._run(x, pos, write, None, causal=True, last_only=False, pick=pick)[:, 0]

    @torch.inference_mode()
    def decode(self, ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of rows (= slots) 0..n-1 at its own position -> logits [n, V]."""
        n = len(ids)
        top = max(positions) + 1
        self.reserve(top)
        p = torch.tensor(positions)
        x = self.embed(torch.tensor(ids).unsqueeze(1))
        kvh, cap = self.kv_heads, self.capacity
        # where each row's new key/value goes in a layer's [slots * kv_heads * capacity, head_dim] view
        flat = ((torch.arange(n) * (kvh * cap)).unsqueeze(1) + torch.arange(kvh).unsqueeze(0) * cap
                + p.unsqueeze(1)).view(-1)
        mask = None
        if n > 1:  # additive, built once per step (a boolean mask is converted in every layer)
            mask = torch.zeros(n, 1, 1, top, dtype=self.dtype).masked_fill_(
                (torch.arange(top).unsqueeze(0) > p.unsqueeze(1)).view(n, 1, 1, top), float("-inf"))

        def write(cache, i, new):
            cache[i].view(-1, self.head_dim).index_copy_(0, flat, new.reshape(-1, self.head_dim))
            return cache[i, :n, :, :top]

        return self._run(x, p.unsqueeze(1), write, mask, causal=False, last_only=True)[:, -1]

    def _run(self, x, pos, write, mask, causal: bool, last_only: bool, pick=None) -> torch.Tensor:
        b, t = x.shape[:2]
        hd = self.head_dim
        cos, sin = self.rotary(x, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(self.layers):
            a, fused, mats = layer.self_attn, self.fused[i], self.mats[i]
            h = layer.input_layernorm(x)
            if fused is not None:
                q, k, v = mats[0](h).split(fused[2], dim=-1)
                q, k, v = q.view(b, t, -1, hd), k.view(b, t, -1, hd), v.reshape(b, t, -1, hd).transpose(1, 2)
            else:
                q = a.q_proj(h).view(b, t, -1, hd)
                k = a.k_proj(h).view(b, t, -1, hd)
                v = a.v_proj(h).view(b, t, -1, hd).transpose(1, 2)
            if self.qk_norm:
                q, k = a.q_norm(q), a.k_norm(k)
            q = _rope(q.transpose(1, 2), cos, sin)
            k = _rope(k.transpose(1, 2), cos, sin)
            keys, values = write(self.k, i, k), write(self.v, i, v)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal and t > 1,
                                               scale=a.scaling, enable_gqa=True)
            x = x + (mats[1] if mats else a.o_proj)(o.transpose(1, 2).reshape(b, t, -1))
            h = layer.post_attention_layernorm(x)
            if fused is not None:
                gate, up = mats[2](h).chunk(2, dim=-1)
                x = x + mats[3](fused[5](gate) * up)
            else:
                x = x + layer.mlp(h)
        if pick is not None:  # each row's own last position
            x = x[torch.arange(b), pick].unsqueeze(1)
        x = self.norm(x[:, -1:] if last_only else x)
        return self.head(x).float()


# --------------------------------------------------------------------------- prefix cache


class PrefixCache:
    """Keys/values of recent prompts, LRU within ``tokens``; a new prompt reuses its longest shared head.

    A chat template's system head (or any repeated prompt start) is then computed once:
    the prefill starts after the reused positions. At least the prompt's last token is
    always recomputed, since its logits pick the first new token.
    """

    MIN = 4  # shorter shared heads are not worth the copy

    def __init__(self, tokens: int):
        import collections

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
