"""A lean decode path for Llama-family models over a preallocated slot KV cache.

The generic path (``engine.TorchBackend``) runs the transformers model with a growing
``DynamicCache`` that the engine left-pads on every join, and the model builds a 4-D mask
through ``transformers.masking_utils`` on every step. Here the engine owns one KV tensor
per model, ``[layers, slots, kv_heads, capacity, head_dim]``, preallocated and grown by
doubling; a running sequence lives in one slot (row ``i`` of the batch is slot ``i``) and
writes its new key/value at its own position, so joining, leaving and decoding never copy
the cache (only a leaving row's hole is filled by moving the last row into it). The
forward uses the model's own weights and rotary embedding: fp32 q/k/v and gate/up fused
into one matrix each (oneDNN-packed), homeforge's ``Int8Linear`` fused the same way, other
linears (torch.ao int8) as the modules, RMSNorm as ``F.rms_norm`` where bit-identical; it
runs attention with ``scaled_dot_product_attention`` over the slots' views with a length
mask built in one op. Greedy tokens equal transformers' ``generate`` (tested on Llama,
Qwen2 and Qwen3 in fp32, Llama and Qwen2 in both int8 schemes).

Supported: decoder-only Llama, Mistral (without sliding window), Qwen2 and Qwen3 layouts;
anything else keeps the generic path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _groups(layer, cls):
    """([q, k, v], [gate, up]) when all five are exactly ``cls`` and the MLP has ``act_fn``, else None."""
    a, mlp = layer.self_attn, layer.mlp
    lins = [a.q_proj, a.k_proj, a.v_proj]
    mlp_lins = [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)]
    if not all(type(m) is cls for m in lins + mlp_lins) or not hasattr(mlp, "act_fn"):
        return None
    return lins, mlp_lins


def _fuse(layer):
    """One weight for q/k/v and one for gate/up, when they are plain linears (not quantized).

    The modules' own weights become views of the fused ones, so memory does not grow and
    the transformers model (used for embeddings and the generic path) stays intact.
    """
    groups = _groups(layer, torch.nn.Linear)
    if groups is None:
        return None
    lins, mlp_lins = groups
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
    return out[0], out[1], sizes, out[2], out[3], layer.mlp.act_fn


def _fuse_int8(layer):
    """q/k/v and gate/up as one ``Int8Linear`` (``Q8Linear``) each, when all five are
    (``compress -m int8-dynamic`` / ``-m int8-block``).

    The activation scales are per row (per 32-value block) of the input, so one call
    quantizes the input once and runs one int8 matmul where three (two) did the same work:
    bit-identical outputs, 5 of the 7 per-call quantizations of a layer saved. The modules'
    own weights become row slices of the fused ones, so memory does not grow and the
    transformers forward stays intact. -> (q/k/v module, sizes, gate/up module, activation) or None.
    """
    from homeforge.models.q8 import Q8Linear
    from homeforge.models.quantized import Int8Linear

    for cls in (Int8Linear, Q8Linear):
        groups = _groups(layer, cls)
        if groups is not None:
            break
    else:
        return None
    out = []
    for group in groups:
        if len({m.in_features for m in group}) != 1 or len({m.bias is None for m in group}) != 1:
            return None
        q = torch.cat([m.qweight for m in group])
        bias = None if group[0].bias is None else torch.cat([m.bias for m in group])
        fused = cls(q, torch.cat([m.scales for m in group]), bias)
        start = 0
        for m in group:  # the separate modules read the fused tensors (contiguous row slices)
            rows = slice(start, start + m.out_features)
            m.qweight, m.scales = fused.qweight[rows], fused.scales[rows]
            if bias is not None:
                m.bias = fused.bias[rows]
            start += m.out_features
        out.append(fused)
    return out[0], [m.out_features for m in groups[0]], out[1], layer.mlp.act_fn


class _Packed:
    """A linear whose weight oneDNN has reordered once for its blocked kernels; one row goes to MKL.

    Measured on the 2-core CPUs here (SmolLM2-135M shapes, fp32): 2.0-3.3x faster than
    ``F.linear`` (MKL) at 16-60 rows and 1.2-1.3x at 4 rows, but slower at 1 row, where a
    whole decode step took 49.6 ms packed against 42.6 ms with MKL (medians of 12
    interleaved rounds). So a single row (one stream decoding) keeps ``F.linear`` on the
    original weight. The results differ from MKL's only in summation order, so a request's
    logits can differ in the last bits depending on whether it decodes alone or in a batch
    (a one-row step matches transformers' own forward, which uses MKL). The reordered copy
    costs the memory of the weight once more.
    """

    __slots__ = ("w", "b", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
        self.weight = weight.detach()
        self.w = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)
        self.b = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.numel() == shape[-1]:
            return F.linear(x, self.weight, self.b)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.w, self.b, "none", [], "")
        return y.view(*shape[:-1], y.shape[-1])


def _packable(*mods) -> bool:
    return all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in mods) and \
        torch.backends.mkldnn.is_available()


def _proj(module, pack: bool, rows: int):
    """One projection as a callable: a plain fp32 linear packed (see ``_Packed``), anything else its module."""
    if type(module) is torch.nn.Linear:
        return _linear(module.weight, module.bias, pack and _packable(module), rows)
    return module


def _linear(weight, bias, pack: bool, rows: int):
    if pack:
        try:
            return _Packed(weight, bias, rows)
        except (RuntimeError, AttributeError):  # no oneDNN in this torch build: plain linear
            pass
    return lambda x: F.linear(x, weight, bias)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin`` in four ops, bit for bit.

    ``signed_sin`` is ``sin`` with its first half negated: ``roll`` swaps the halves, and
    ``x2 * -s`` is exactly ``-x2 * s``.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _norm(module, dtype: torch.dtype):
    """An RMSNorm as one ``F.rms_norm`` call where that gives the module's output bit for bit.

    transformers' RMSNorm is seven ops (cast, square, mean, add, rsqrt, two products); the
    fused op saves ~12 us per call, 61 calls per SmolLM2 step. Only for fp32 activations
    and weights (other dtypes cast differently), and checked at construction on rows of
    very different scale (variance far above and near ``eps``, a zero row, a strided
    slice); anything that differs (another formula) keeps the module.
    """
    w, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if dtype != torch.float32 or not isinstance(w, torch.Tensor) or w.dim() != 1 or w.dtype != torch.float32 \
            or not isinstance(eps, float):
        return module
    shape = (w.shape[0],)

    def fused(x):
        return F.rms_norm(x, shape, w, eps)

    with torch.no_grad():
        x = torch.randn(2, 6, w.shape[0], generator=torch.Generator().manual_seed(0))
        x = x * torch.tensor([3.0, 1e-3, 0.0, 1e3, 1e-6, 1.0]).view(1, 6, 1)
        probes = (x, x[:, -1:], x.transpose(0, 1))
        return fused if all(torch.equal(fused(p), module(p)) for p in probes) else module


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
        self.norms = [(_norm(layer.input_layernorm, self.dtype), _norm(layer.post_attention_layernorm, self.dtype))
                      for layer in self.layers]
        self.final_norm = _norm(self.norm, self.dtype)
        # per layer: (q/k/v sizes, activation) when q/k/v and gate/up run fused, else None (the modules), and
        # q/k/v, o, gate/up, down as callables (fp32: oneDNN-packed where possible; Int8Linear: fused copies
        # for q/k/v and gate/up; other linears: the modules)
        self.fused: list = []
        self.mats: list = []
        for layer in self.layers:
            a, mlp = layer.self_attn, layer.mlp
            f = _fuse(layer)
            q8 = None if f is not None else _fuse_int8(layer)
            if f is not None:
                pack = packed and f[0].dtype == torch.float32 and torch.backends.mkldnn.is_available()
                self.fused.append((f[2], f[5]))
                self.mats.append((_linear(f[0], f[1], pack, slots), _proj(a.o_proj, packed, slots),
                                  _linear(f[3], f[4], pack, slots), _proj(mlp.down_proj, packed, slots)))
            elif q8 is not None:
                self.fused.append((q8[1], q8[3]))
                self.mats.append((q8[0], _proj(a.o_proj, packed, slots), q8[2], _proj(mlp.down_proj, packed, slots)))
            else:
                self.fused.append(None)
                self.mats.append(None)
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
        half = hd // 2
        cos, sin = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
        for i, layer in enumerate(self.layers):
            a, fused, mats, (norm1, norm2) = layer.self_attn, self.fused[i], self.mats[i], self.norms[i]
            h = norm1(x)
            if fused is not None and not self.qk_norm:  # rotate q and k heads together: one rope per layer
                nq, nk, _ = fused[0]
                qkv = mats[0](h)
                qk = _rope(qkv[..., :nq + nk].view(b, t, -1, hd).transpose(1, 2), cos, sin)
                q, k = qk[:, :nq // hd], qk[:, nq // hd:]
                v = qkv[..., nq + nk:].reshape(b, t, -1, hd).transpose(1, 2)
            else:
                if fused is not None:
                    q, k, v = mats[0](h).split(fused[0], dim=-1)
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
            h = norm2(x)
            if fused is not None:
                gate, up = mats[2](h).chunk(2, dim=-1)
                x = x + mats[3](fused[1](gate) * up)
            else:
                x = x + layer.mlp(h)
        if pick is not None:  # each row's own last position
            x = x[torch.arange(b), pick].unsqueeze(1)
        x = self.final_norm(x[:, -1:] if last_only else x)
        return self.head(x).float()
