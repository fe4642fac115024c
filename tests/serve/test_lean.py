"""The lean engine (slot KV cache, chunked prefill, prefix cache): tokens equal transformers' generate."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch

from homeforge.serve.engine import Delta, Finish, GenRequest, TorchBackend
from homeforge.serve.lean import SlotLM, supports
from homeforge.serve.lean_engine import SlotEngine


class Collector:
    def __init__(self):
        self.ids, self.finish, self.done = [], None, threading.Event()

    def __call__(self, ev):
        if isinstance(ev, Delta) and not ev.prompt:
            self.ids += [t.id for t in ev.tokens]
        elif isinstance(ev, Finish):
            self.finish = ev
            self.done.set()


class Tok:  # the engine decodes text for streaming; ids are what these tests compare
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def tiny(kind: str, int8: bool | str = False):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    cls, cfg_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config),
                    "qwen3": (Qwen3ForCausalLM, Qwen3Config)}[kind]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3)
    model = cls(cfg).eval()
    with torch.no_grad():  # transformers initialises biases to 0 and norm weights to 1: make both matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5, 0.5)
    if int8 == "homeforge":  # what `compress -m int8-dynamic` loads: Int8Linear, per-row activation scales
        from homeforge.models.quantized import to_dynamic_int8

        model = to_dynamic_int8(model)
    elif int8 == "block":  # what `compress -m int8-block` loads: Q8Linear everywhere, the head included
        from homeforge.models.q8 import quantize_q8, to_q8

        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model = to_q8(model, {n: quantize_q8(m.weight) for n, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear)})
    elif int8:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def hf_greedy(model, ids, n):
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


PROMPTS = [[1, 5, 7, 9, 20, 31, 4], [3, 4], [100, 200, 50, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [250],
           [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 17, 18, 19, 21, 22, 23, 24, 25, 26, 27]]


@pytest.mark.parametrize("kind,int8", [("llama", False), ("qwen2", False), ("qwen3", False), ("llama", "homeforge"),
                                      ("qwen2", "block"), ("qwen3", "block")])
def test_lean_engine_equals_transformers_generate(kind, int8):
    """Staggered arrivals, prefill chunks of 3 tokens between decode steps, rows leaving at
    different lengths: every request gets exactly the tokens transformers' generate picks
    (homeforge's int8 too: its activation scales are per row or per block of a row, so rows
    do not mix)."""
    torch.set_num_threads(1)
    model = tiny(kind, int8)
    assert supports(model)
    want = {tuple(p): hf_greedy(model, p, 26) for p in PROMPTS}
    assert len({tuple(w) for w in want.values()}) == len(PROMPTS)
    eng = SlotEngine(TorchBackend(model), Tok(), max_batch_size=3, prefill_chunk=3, prefix_cache_tokens=0).start()
    try:
        cols = []
        for i, p in enumerate(PROMPTS * 2):
            n = 8 + 2 * i
            c = Collector()
            eng.submit([GenRequest(p, n, c)])
            cols.append((p, n, c))
            time.sleep(0.002)
        for p, n, c in cols:
            assert c.done.wait(60)
            assert c.finish.reason == "length" and c.ids == want[tuple(p)][:n], p
        assert eng.max_batch_seen == 3
    finally:
        eng.shutdown()


@pytest.mark.parametrize("kind,scheme", [("llama", "torch.ao"), ("qwen2", "torch.ao"), ("llama", "homeforge"),
                                         ("qwen2", "homeforge"), ("llama", "block")])
def test_lean_engine_int8_equals_transformers_generate_per_stream(kind, scheme):
    """torch.ao's dynamic int8 scales activations per tensor, so a row's numbers depend on
    the other rows of its batch (in transformers' own batched generate too); one stream at a
    time the lean engine picks exactly generate's tokens. homeforge's Int8Linear runs q/k/v
    and gate/up fused in the lean engine (one activation quantization each)."""
    torch.set_num_threads(1)
    model = tiny(kind, int8=True if scheme == "torch.ao" else scheme)
    assert supports(model)
    fused = SlotLM(model, 2).fused
    assert all(f is not None for f in fused) == (scheme != "torch.ao")
    eng = SlotEngine(TorchBackend(model), Tok(), max_batch_size=3, prefix_cache_tokens=0).start()
    try:
        for p in PROMPTS:
            c = Collector()
            eng.submit([GenRequest(p, 20, c)])
            assert c.done.wait(60)
            assert c.ids == hf_greedy(model, p, 20), p
    finally:
        eng.shutdown()


def test_prefix_cache_reuses_a_shared_head_with_the_same_tokens():
    torch.set_num_threads(1)
    model = tiny("llama")
    head = [7, 3, 9, 11, 40, 41, 42, 43, 44, 45]
    prompts = [head + [5, 6], head + [100, 101, 102], head, head + [5, 6]]
    eng = SlotEngine(TorchBackend(model), Tok(), max_batch_size=2, prefix_cache_tokens=64).start()
    try:
        got = []
        for p in prompts:  # one by one, so each finds the previous ones cached
            c = Collector()
            eng.submit([GenRequest(p, 12, c)])
            assert c.done.wait(60)
            got.append(c.ids)
    finally:
        eng.shutdown()
    assert eng.prefix.hits == 3 and eng.prefix.reused == len(head) + (len(head) - 1) + len(head) + 1
    assert got == [hf_greedy(model, p, 12) for p in prompts]


def test_prefix_cache_stays_within_its_budget():
    model = tiny("llama")
    eng = SlotEngine(TorchBackend(model), Tok(), max_batch_size=2, prefix_cache_tokens=20)
    lm = eng.lm
    for i in range(6):
        ids = [i + 1] * 8
        lm.prefill(2, ids, 0)
        eng.prefix.store(lm, 2, ids)
    assert eng.prefix.size <= 20 and len(eng.prefix.entries) == 2


def test_cache_grows_by_doubling_and_rows_keep_their_keys():
    model = tiny("llama")
    lm = SlotLM(model, slots=3, capacity=16)
    long = list(range(1, 60))
    lm.prefill(1, long, 0)
    assert lm.capacity == 64
    ref = lm.k[:, 1, :, :59].clone()
    lm.move(1, 0, 59)
    assert torch.equal(lm.k[:, 0, :, :59], ref)
    lm.reserve(100)
    assert lm.capacity == 128 and torch.equal(lm.k[:, 0, :, :59], ref)


def test_a_failing_prefill_fails_only_its_request():
    """A batched prefill that fails is retried one request at a time: only the bad one fails."""
    model = tiny("llama")
    eng = SlotEngine(TorchBackend(model), Tok(), max_batch_size=4)
    real = eng.lm.prefill

    def flaky(slot, ids, start, last_only=True):
        if len(ids) == 3:
            raise RuntimeError("simulated failure")
        return real(slot, ids, start, last_only)

    def flaky_rows(base, prompts):
        if any(len(p) == 3 for p in prompts):
            raise RuntimeError("simulated failure")
        return real_rows(base, prompts)

    real_rows = eng.lm.prefill_rows
    eng.lm.prefill, eng.lm.prefill_rows = flaky, flaky_rows
    eng.start()
    try:
        bad, good = Collector(), Collector()
        eng.submit([GenRequest([1, 2, 3], 5, bad), GenRequest([4, 5], 5, good)])
        assert bad.done.wait(10) and good.done.wait(10)
        assert bad.finish.reason == "error" and "simulated" in bad.finish.error
        assert good.finish.reason == "length" and good.ids == hf_greedy(model, [4, 5], 5)
    finally:
        eng.shutdown()


def test_unsupported_models_keep_the_generic_engine(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from homeforge.config import ServeConfig
    from homeforge.errors import HomeforgeError
    from homeforge.serve.engine import Engine
    from homeforge.serve.state import make_engine

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).eval()
    assert not supports(gpt2) and supports(tiny("qwen2"))
    cfg = ServeConfig(model_dir=str(tmp_path))
    assert type(make_engine(cfg, TorchBackend(gpt2), Tok())) is Engine
    assert type(make_engine(cfg, TorchBackend(tiny("llama")), Tok())) is SlotEngine
    assert type(make_engine(cfg.model_copy(update={"engine": "generic"}), TorchBackend(tiny("llama")), Tok())) is Engine
    with pytest.raises(HomeforgeError, match="engine=lean"):
        make_engine(cfg.model_copy(update={"engine": "lean"}), TorchBackend(gpt2), Tok())


def test_generic_backend_uses_the_current_cache_argument():
    """No deprecated ``past_key_values`` argument (it warns now and goes away in a later transformers)."""
    model = tiny("llama")
    backend = TorchBackend(model)
    ids = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits, cache = backend.forward(ids, torch.arange(3).unsqueeze(0), torch.ones_like(ids), backend.new_cache())
    assert cache.get_seq_length() == 3 and logits.shape == (1, 3, 320)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_slot_forward_is_the_transformers_forward_bit_for_bit(kind):
    """Without oneDNN packing the slot forward runs the same fp32 ops as transformers (fused
    RMSNorm, rope on q and k together, fused q/k/v): a prefill's logits are bitwise equal.
    The fused norms must actually be in use (a silent fallback would only cost speed)."""
    torch.set_num_threads(1)
    model = tiny(kind)
    ids = PROMPTS[2]
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0]
    lm = SlotLM(model, 2, packed=False)
    assert torch.equal(lm.prefill(0, ids, 0, last_only=False), want)
    assert all(n is not layer.input_layernorm for n, layer in zip((a for a, _ in lm.norms), lm.layers, strict=True))


@pytest.mark.parametrize("scheme", ["homeforge", "block"])
def test_fused_int8_projections_equal_the_modules(scheme):
    """q/k/v and gate/up of homeforge's Int8Linear (Q8Linear) run as one module each: bitwise
    the same outputs as the separate modules gave before the fusion (biases non-zero), and the
    modules, which now read row slices of the fused weights, still give them."""
    from homeforge.serve.lean import _fuse_int8

    model = tiny("qwen2", int8=scheme)
    layer = model.model.layers[0]
    a, mlp = layer.self_attn, layer.mlp
    assert a.q_proj.bias is not None and a.q_proj.bias.abs().sum() > 0
    x = torch.randn(5, 64)
    with torch.inference_mode():
        want_qkv = torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1)
        want_gu = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1)
        qkv, sizes, gate_up, _ = _fuse_int8(layer)
        assert type(qkv) is type(a.q_proj)
        assert torch.equal(qkv(x), want_qkv) and torch.equal(gate_up(x), want_gu)
        assert torch.equal(torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1), want_qkv)
        assert torch.equal(torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1), want_gu)
    assert a.q_proj.qweight.data_ptr() == qkv.qweight.data_ptr()  # no second copy of the weights
    assert sizes == [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features]
