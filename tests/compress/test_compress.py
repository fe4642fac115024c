"""`homeforge compress` on tiny models: each method changes the model in the claimed way,
the result loads through models.io, and the gate refuses a degraded model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from safetensors import safe_open

from evaluate.helpers import train_debug_model  # tests/evaluate/helpers.py
from homeforge.compress import prune, quantize
from homeforge.compress import run as C
from homeforge.config import CompressConfig, load_config
from homeforge.errors import HomeforgeError
from homeforge.models import quantized
from homeforge.models.io import load_causal_lm
from homeforge.train.methods import compression as train

QUIET = Console(quiet=True)
FAST = ["max_examples=12", "latency_repeats=1", "latency_seq_len=16", "context=64"]


@pytest.fixture(scope="module")
def trained(tiny_dataset, tiny_tokenizer, tmp_path_factory):
    torch.set_num_threads(1)
    return train_debug_model(tiny_dataset, tiny_tokenizer, tmp_path_factory.mktemp("cm") / "model", steps=40)


def _cfg(*extra):
    return load_config(CompressConfig, overrides=[*FAST, *extra])


def _dtypes(path):
    with safe_open(str(path / "model.safetensors"), "pt") as st:
        return {k: st.get_slice(k).get_dtype() for k in st.keys()}


def test_int8_and_int4_math():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q, s = quantize.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert ((quantized.dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()
    p4, s4 = quantize.quantize_int4(w, 16)
    assert p4.dtype == torch.uint8 and p4.shape == (48, 32) and s4.shape == (48, 4)
    deq = quantized.dequantize_int4(p4, s4)
    err = (deq - w).abs().reshape(48, 4, 16)
    assert (err <= s4[..., None] / 2 + 1e-6).all()
    # packing round trip: re-quantizing the dequantized weights gives the same codes
    assert torch.equal(quantize.quantize_int4(deq, 16)[0], p4)
    with pytest.raises(HomeforgeError, match="group size"):
        quantize.quantize_int4(w, 48)


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-block", "int8-weight-only", "int4-weight-only"])
def test_quantized_artifact_loads_and_matches(method, trained, tiny_dataset, tmp_path):
    out = tmp_path / method
    # the plain int8 path (no SmoothQuant, every Linear and the head int8): the kernel is checked exactly below
    plain_int8 = ["smoothquant_alpha=null", "quantize_head=true", "keep_fp32=[]"]
    r = C.run(trained, tiny_dataset, _cfg(f"method={method}", "group_size=32", *plain_int8), out, False, QUIET)
    manifest = json.loads((out / "homeforge.json").read_text())
    q = manifest["quantization"]
    # 2 layers x (q, k, v, o, gate, up, down), and for int8-dynamic / int8-block the output head (quantize_head)
    assert q["method"] == method and len(q["modules"]) == (15 if method in ("int8-dynamic", "int8-block") else 14)
    dt = _dtypes(out)
    want = "U8" if method.startswith("int4") else "I8"
    assert all(dt[f"{m}.qweight"] == want for m in q["modules"])
    assert not any(k.endswith("proj.weight") for k in dt)
    ratio = r["before"]["linear_bytes"] / r["after"]["linear_bytes"]
    assert ratio > (6.0 if method.startswith("int4") else 3.5)
    assert r["after"]["weights_bytes"] < r["before"]["weights_bytes"]
    assert r["gate"]["passed"] and abs(r["gate"]["ppl_change"]) < (0.05 if method.startswith("int4") else 0.01)

    # models.io loads it transparently, with the kernels for this hardware
    model, tok = load_causal_lm(out)
    ref, _ = load_causal_lm(trained)
    layer = model.model.layers[0].self_attn.q_proj
    if method == "int8-dynamic":
        assert isinstance(layer, quantized.Int8Linear) and isinstance(model.lm_head, quantized.Int8Linear)
        # the int8 kernel computes exactly: int8 rows x int8 columns, int32 sums, then the two scales
        h = torch.randn(3, layer.in_features) * torch.tensor([[1.0], [50.0], [0.01]])  # rows of very different scale
        qw, sw = quantize.quantize_int8(ref.model.layers[0].self_attn.q_proj.weight)
        sx = h.abs().amax(-1, keepdim=True) / 127
        want = (torch.round(h / sx).double() @ qw.double().t()) * sx.double() * sw.double()
        with torch.no_grad():
            assert torch.allclose(layer(h).double(), want, rtol=1e-5, atol=1e-6 * want.abs().max())
        assert dt["lm_head.qweight"] == "I8" and dt["model.embed_tokens.weight"] == "F32"
        assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    elif method == "int8-block":
        from homeforge.models.q8 import Q8Linear, dequantize_q8, quantize_q8

        assert isinstance(layer, Q8Linear) and isinstance(model.lm_head, Q8Linear)
        qw, sw = quantize_q8(ref.model.layers[0].self_attn.q_proj.weight)
        assert torch.equal(layer.qweight, qw) and sw.shape == (layer.out_features, layer.in_features // 32)
        # llama.cpp's q8_0 arithmetic, written out: each 32-value block of the input and of the weight
        # rows quantized on its own, the int8 block products summed exactly, then the two scales
        h = torch.randn(3, layer.in_features) * torch.tensor([[1.0], [50.0], [0.01]])
        hb = h.view(3, -1, 32)
        sx = hb.abs().amax(-1, keepdim=True) / 127
        xq = torch.round(hb / sx)
        want = torch.einsum("mbk,nbk->mnb", xq.double(), qw.view(qw.shape[0], -1, 32).double())
        want = (want * sx.double().squeeze(-1)[:, None, :] * sw.double()[None]).sum(-1)
        with torch.no_grad():
            assert torch.allclose(layer(h).double(), want, rtol=1e-5, atol=1e-6 * want.abs().max())
        assert torch.equal(dequantize_q8(qw, sw), quantize.fake_quantized_weights(ref, method)[
            "model.layers.0.self_attn.q_proj"])
    else:  # weight-only on a CPU: exactly the dequantized weights
        fq = quantize.fake_quantized_weights(ref, method, 32)
        assert torch.equal(layer.weight, fq["model.layers.0.self_attn.q_proj"])
    x = torch.tensor([tok("Return the number of items in the list.")["input_ids"]])
    with torch.no_grad():
        a, b = model(input_ids=x).logits, ref(input_ids=x).logits
    assert (a - b).abs().max() / b.abs().max() < (0.1 if method.startswith("int4") else 0.03)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    assert (out / "compress.md").read_text().count("|") > 10
    assert (out / "compress.png").read_bytes()[:4] == b"\x89PNG"
    plain = quantized.load_quantized(out, q, dequantize=True)  # for exporters: ordinary Linear layers
    assert type(plain.model.layers[0].mlp.up_proj) is torch.nn.Linear and type(plain.lm_head) is torch.nn.Linear
    with torch.no_grad():
        c = plain(input_ids=x).logits
    assert (c - b).abs().max() / b.abs().max() < (0.1 if method.startswith("int4") else 0.03)
    with pytest.raises(HomeforgeError, match="already quantized"):
        C.run(out, tiny_dataset, _cfg("method=int8-dynamic"), tmp_path / "again", False, QUIET)


def test_gate_refuses_degraded_model_and_force_writes_it(trained, tiny_dataset, tmp_path):
    harsh = ["method=prune", "prune.kind=structured", "prune.mlp_keep=0.1", "prune.heads_keep=0.5",
             "gates.max_ppl_increase=0.01"]
    out = tmp_path / "pruned"
    with pytest.raises(C.CompressGateError, match="quality gate") as exc:
        C.run(trained, tiny_dataset, _cfg(*harsh), out, False, QUIET)
    assert exc.value.exit_code == 3
    assert not out.exists() and not list(tmp_path.glob(".pruned.tmp-*"))  # nothing half-written
    r = C.run(trained, tiny_dataset, _cfg(*harsh), out, True, QUIET)
    assert not r["gate"]["passed"] and r["after"]["ppl"] > r["before"]["ppl"] * 1.01
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 13 and cfg["num_key_value_heads"] == 1 and cfg["num_attention_heads"] == 2
    assert cfg["head_dim"] == 16
    assert r["after"]["weights_bytes"] < r["before"]["weights_bytes"]
    model, _ = load_causal_lm(out)  # a plain, smaller HF model
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 13)


def test_structured_prune_keep_all_is_identity_and_shrinks(trained):
    ref, tok = load_causal_lm(trained)
    same, stats = prune.prune_structured(ref, 1.0, 1.0)
    x = torch.tensor([tok("Raise ValueError if the argument is negative.")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(same(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5)
    small, stats = prune.prune_structured(ref, 0.5, 0.5)
    assert stats["intermediate_size"] == [128, 64] and stats["num_key_value_heads"] == [2, 1]
    assert stats["params"][1] < stats["params"][0]
    with torch.no_grad():
        assert small(input_ids=x).logits.shape == ref(input_ids=x).logits.shape


def test_unstructured_prune_hits_target_sparsity(trained, tiny_dataset, tmp_path):
    r = C.run(trained, tiny_dataset, _cfg("method=prune", "prune.kind=unstructured", "prune.sparsity=0.6",
                                          "gates.max_ppl_increase=10"), tmp_path / "sparse", False, QUIET)
    assert r["after"]["linear_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert r["prune"]["linear_sparsity"] == pytest.approx(0.6, abs=1e-3)
    model, _ = load_causal_lm(tmp_path / "sparse")
    emb = model.get_input_embeddings().weight
    assert (emb != 0).all()  # embeddings and norms are untouched


def test_qat_trains_then_stores_int8(trained, tiny_dataset, tmp_path):
    r = C.run(trained, tiny_dataset, _cfg("method=qat", "qat.steps=4", "qat.seq_len=32", "qat.batch_size=2"),
              tmp_path / "qat", False, QUIET)
    q = json.loads((tmp_path / "qat" / "homeforge.json").read_text())["quantization"]
    assert q["method"] == "int8-dynamic" and q["trained_with"] == "qat"
    assert r["qat"]["steps"] == 4 and r["after"]["linear_bytes"] * 3.5 < r["before"]["linear_bytes"]
    ref, _ = load_causal_lm(trained, with_tokenizer=False)
    with safe_open(str(tmp_path / "qat" / "model.safetensors"), "pt") as st:
        qw = st.get_tensor("model.layers.0.mlp.up_proj.qweight")
    assert not torch.equal(qw, quantize.quantize_int8(ref.model.layers[0].mlp.up_proj.weight)[0])  # it trained


def test_fake_quant_matches_stored_int8():
    w = torch.randn(8, 32, requires_grad=True)
    fq = train.fake_quant_weight(w)
    assert torch.allclose(fq, quantized.dequantize_int8(*quantize.quantize_int8(w)))
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through


def test_distill_student_learns_from_teacher(trained, tiny_tokenizer, tiny_dataset, tmp_path):
    teacher, tok = load_causal_lm(trained)
    student, _ = load_causal_lm(trained)
    toks = train.token_stream([json.loads(line)["text"] for line in open(tiny_dataset / "train.jsonl")][:50], tok)
    # a student identical to the teacher has zero KL: with alpha=1 the loss is 0
    task = train.distill_task(teacher, student, toks, train.short_run_config(
        steps=1, lr=1e-9, seq_len=32, batch_size=2, seed=0, output_dir=str(tmp_path / "run")), alpha=1.0, temperature=2.0)
    out = task.loss_fn(student, task.train.batch(0, 2))
    assert out.loss_sum.item() == pytest.approx(0.0, abs=1e-4) and out.n_tokens == 64
    r = C.run(trained, tiny_dataset, _cfg("method=distill", "distill.steps=3", "distill.seq_len=32",
                                          "distill.batch_size=2", "distill.student_overrides={num_hidden_layers: 1}",
                                          "gates.max_ppl_increase=100"), tmp_path / "student", False, QUIET)
    cfg = json.loads((tmp_path / "student" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] == len(tok)
    assert r["after"]["params"] < r["before"]["params"] and r["distill"]["alpha"] == 0.5


def test_bad_input(trained, tiny_dataset, tmp_path):
    from homeforge.errors import ConfigError

    with pytest.raises(ConfigError, match="method"):
        _cfg("method=int9")
    with pytest.raises(HomeforgeError, match="no --data"):
        C.run(trained, None, _cfg(), tmp_path / "x", False, QUIET)
    with pytest.raises(HomeforgeError, match="does not exist"):
        C.run(tmp_path / "missing", tiny_dataset, _cfg(), tmp_path / "x", False, QUIET)
    qwen_like = load_causal_lm(trained)[0]
    qwen_like.config.model_type = "qwen2_moe"
    with pytest.raises(HomeforgeError, match="does not support"):
        prune.prune_structured(qwen_like, 0.5, 1.0)
    assert not (tmp_path / "x").exists()


def test_cli_compress_exit_codes(trained, tiny_dataset, tmp_path):
    def hf(*args):
        return subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    r = hf("compress", trained, "-m", "int8-dynamic", "-d", tiny_dataset, "-o", tmp_path / "q", *FAST, "threads=1")
    assert r.returncode == 0, r.stderr
    assert "Linear weights" in r.stdout and "gate PASS" in r.stdout
    r = hf("compress", trained, "-m", "prune", "-d", tiny_dataset, "-o", tmp_path / "p", *FAST, "threads=1",
           "prune.mlp_keep=0.1", "prune.heads_keep=0.5", "gates.max_ppl_increase=0.0")
    assert r.returncode == 3 and "quality gate" in r.stderr and not (tmp_path / "p").exists()


def test_classifier_int8_accuracy_gate(tiny_tokenizer, tmp_path):
    from transformers import LlamaForSequenceClassification

    from evaluate.helpers import write_dataset
    from homeforge.config import EvalConfig
    from homeforge.evaluate import run as R
    from homeforge.models.presets import preset_config

    tok = tiny_tokenizer
    cfg = preset_config("debug", len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    cfg.num_labels = 3
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(cfg)
    clf.config.architectures = ["LlamaForSequenceClassification"]
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    rows = [{"text": f"request {i} about {['disks', 'login', 'vpn'][i % 3]} number {i * 7}", "label": i % 3}
            for i in range(24)]
    data = write_dataset(tmp_path / "cls", "classification", {"val": rows}, tok, labels=["hw", "sw", "net"],
                         labels_in_index=True)
    r = C.run(tmp_path / "clf", data, _cfg("method=int8-dynamic", "gates.max_accuracy_drop=0.1"), tmp_path / "q",
              False, QUIET)
    assert "accuracy" in r["before"] and r["gate"]["passed"] and "ppl" not in r["after"]
    q = json.loads((tmp_path / "q" / "homeforge.json").read_text())["quantization"]
    assert "score" not in q["modules"] and len(q["modules"]) == 14  # the classification head stays fp32
    # homeforge eval loads the int8 classifier transparently
    res = R.evaluate_model(tmp_path / "q", data, load_config(EvalConfig, overrides=["robustness.enabled=false", "max_examples=12"]),
                           QUIET)
    assert res["classification"]["accuracy"] == pytest.approx(r["after"]["accuracy"])
    assert list(res["classification"]["per_class"]) == ["hw", "sw", "net"]  # names from index.json
    with pytest.raises(HomeforgeError, match="for causal language models"):
        C.run(tmp_path / "clf", data, _cfg("method=distill"), tmp_path / "d", False, QUIET)
    with pytest.raises(HomeforgeError, match="needs a classification dataset"):
        C.run(tmp_path / "clf", _text_dataset(tmp_path, tok), _cfg("method=int8-dynamic"), tmp_path / "d", False, QUIET)
    assert not (tmp_path / "d").exists()


def _text_dataset(tmp_path, tok):
    from evaluate.helpers import write_dataset

    return write_dataset(tmp_path / "txt", "text", {"val": [{"text": "hello there"}]}, tok)


def test_gpu_path_without_torchao_falls_back_with_a_warning(trained, monkeypatch):
    """The torchao (GPU) path is behind a capability check; without torchao it warns and keeps fp32 weights."""
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *a, **k):
        if name.startswith("torchao"):
            raise ImportError("no torchao")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    model, _ = load_causal_lm(trained, with_tokenizer=False)
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.warns(UserWarning, match="torchao is not installed"):
        quantized._torchao_quantize(model, "int8-weight-only", 64)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_smoothquant_folds_exactly_and_cuts_int8_error_on_outlier_channels():
    """SmoothQuant changes nothing in fp32 and, on a model whose activations have outlier channels
    (as real LLMs do), makes per-token int8 much closer to fp32 than quantizing it as it is."""
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from homeforge.compress import smooth

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # grouped-query attention, q/k/v biases
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # a few channels 30x larger than the rest, as in trained LLMs
            layer.input_layernorm.weight[[3, 17]] = 30.0
            layer.post_attention_layernorm.weight[[5, 40]] = 30.0
            layer.mlp.up_proj.weight[[7, 90]] *= 30.0
    batches = [torch.randint(0, 128, (1, 48)) for _ in range(4)]
    x = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        ref = model(x).logits
        smoothed = copy.deepcopy(model)
        info = smooth.smooth(smoothed, batches, alpha=0.5)  # random weights have no outliers of their own
        assert info["folded"] == 8 and not info["skipped"]  # 2 layers x (qkv, gate/up, down, o)
        assert (smoothed(x).logits - ref).abs().max() < 1e-4 * ref.abs().max()  # exact in fp32
        errors = []
        for m in (copy.deepcopy(model), smoothed):
            quantized.to_dynamic_int8(m)
            errors.append(float((m(x).logits - ref).pow(2).mean().sqrt() / ref.std()))  # relative RMS error
    assert errors[1] < 0.5 * errors[0], errors  # measured 0.028 vs 0.062


@pytest.mark.parametrize("bar", [0.0, 1.0])
def test_int8_layout_is_the_fastest_that_keeps_agreement(bar, trained, tiny_dataset, tmp_path):
    """Defaults: SmoothQuant, then layouts fastest first (all int8, down projections fp32, head fp32 too);
    the first reaching int8_min_agreement is written, else the most accurate one."""
    out = tmp_path / "int8"
    r = C.run(trained, tiny_dataset, _cfg("method=int8-dynamic", f"int8_min_agreement={bar}"), out, False, QUIET)
    q = json.loads((out / "homeforge.json").read_text())["quantization"]
    assert q["smoothing"]["folded"] == 8 and q["smoothing"]["alpha"] == 0.8  # 2 layers x (qkv, gate/up, down, o)
    tried = q["layout"]["tried"]
    if bar == 0.0:  # the fastest layout passes at once: every Linear and the head int8
        assert len(tried) == 1 and len(q["modules"]) == 15 and "lm_head" in q["modules"]
    else:  # tried in order until one agrees on every token; else all three, and the most accurate kept
        order = [(True, []), (True, ["down_proj"]), (False, ["down_proj"])]
        assert [(t["quantize_head"], t["keep_fp32"]) for t in tried] == order[:len(tried)]
        assert all(t["agreement"] < 1.0 for t in tried[:-1])
        best = tried[-1] if tried[-1]["agreement"] >= 1.0 else max(tried, key=lambda t: t["agreement"])
        assert len(tried) == 3 or best is tried[-1]
        assert (q["layout"]["quantize_head"], q["layout"]["keep_fp32"]) == (best["quantize_head"], best["keep_fp32"])
        names = q["modules"]
        assert ("lm_head" in names) == best["quantize_head"]
        assert any(n.endswith("down_proj") for n in names) == (best["keep_fp32"] == [])
    assert r["gate"]["passed"] and abs(r["gate"]["ppl_change"]) < 0.01


def test_int8_dynamic_keeps_the_named_layers_fp32(trained, tiny_dataset, tmp_path):
    out = tmp_path / "int8"
    C.run(trained, tiny_dataset, _cfg("method=int8-dynamic", "keep_fp32=[down_proj]", "quantize_head=false"), out,
          False, QUIET)
    q = json.loads((out / "homeforge.json").read_text())["quantization"]
    assert "layout" not in q and len(q["modules"]) == 12
    assert not any(m.endswith("down_proj") or m == "lm_head" for m in q["modules"])
    dt = _dtypes(out)
    assert dt["model.layers.0.mlp.down_proj.weight"] == "F32" and dt["model.layers.0.mlp.up_proj.qweight"] == "I8"
    model, _ = load_causal_lm(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, quantized.Int8Linear)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
