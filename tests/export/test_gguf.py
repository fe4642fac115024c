"""GGUF export: read back with gguf's reader (tensors, shapes, types, metadata), load back
with transformers' GGUF loader (logits, tokenizer), Q/K permutation, bad input, import round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from homeforge.config import ExportConfig, ImportConfig, load_config
from homeforge.errors import HomeforgeError
from homeforge.export import run_export
from homeforge.export.common import ParityError
from homeforge.export.importer import import_gguf
from homeforge.models.io import load_causal_lm

from .conftest import logits

TEXT = "Return the number of items in the container."
LAYER_TENSORS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"]


def _export(src, out, *overrides):
    cfg = load_config(ExportConfig, overrides=["format=gguf", *overrides])
    return run_export(src, out, cfg)


@pytest.fixture(scope="module")
def exports(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {t: _export(llama_dir, root / t, f"gguf.outtype={t}") for t in ("f32", "f16", "q8_0")}


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_gguf_reads_back_with_right_tensors_shapes_types_and_metadata(exports, llama_dir, outtype):
    from gguf import GGUFReader

    model, tok = load_causal_lm(llama_dir)
    cfg = model.config
    path = exports[outtype] / f"model-{outtype}.gguf"
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(cfg.num_hidden_layers) for n in LAYER_TENSORS}
    assert set(tensors) == expected  # tied embeddings: no output.weight
    hf = model.state_dict()
    hf_names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
                "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
                "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
                "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight"}
    for gname, hname in hf_names.items():
        assert list(reversed(tensors[gname].shape.tolist())) == list(hf[hname].shape), gname
    matrix_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[outtype]
    for name, t in tensors.items():
        assert t.tensor_type.name == ("F32" if "norm" in name else matrix_type), name

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2
    assert field("llama.embedding_length") == 64
    assert field("llama.feed_forward_length") == 128
    assert field("llama.attention.head_count") == 4
    assert field("llama.attention.head_count_kv") == 2
    assert field("llama.rope.dimension_count") == 16
    assert field("llama.context_length") == 256
    assert field("general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
    assert field("tokenizer.ggml.model") == "gpt2"
    # llama.cpp's name for GPT-2's byte-level regex (what `homeforge prepare` trains); "gpt2" is refused
    assert field("tokenizer.ggml.pre") == "gpt-2"
    assert field("llama.attention.key_length") == field("llama.attention.value_length") == 16
    assert field("tokenizer.ggml.add_bos_token") is False and field("tokenizer.ggml.add_eos_token") is False
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size
    assert tokens[tok.eos_token_id] == "<|endoftext|>"
    assert field("tokenizer.ggml.token_type")[tok.convert_tokens_to_ids("<|im_end|>")] == 3  # CONTROL
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.chat_template") == tok.chat_template
    assert len(field("tokenizer.ggml.merges")) > 100

    manifest = json.loads((exports[outtype] / "homeforge.json").read_text())
    parity = manifest["metrics"]["parity"]
    assert parity["passed"] and parity["tokenizer_equal"] and manifest["metrics"]["readback"]["passed"]


@pytest.mark.parametrize("outtype,rel", [("f32", 1e-6), ("f16", 1e-2), ("q8_0", 5e-2)])
def test_gguf_loads_in_transformers_with_close_logits(exports, llama_dir, outtype, rel):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = load_causal_lm(llama_dir)
    d = exports[outtype]
    loaded = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=f"model-{outtype}.gguf", dtype=torch.float32)
    gtok = AutoTokenizer.from_pretrained(str(d), gguf_file=f"model-{outtype}.gguf")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False, add_generation_prompt=True)
    for text in (TEXT, chat, "  spaces\tand\nnewlines ÄÖ 123"):
        assert gtok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(TEXT)["input_ids"]
    a, b = logits(model, ids), logits(loaded, ids)
    assert a.abs().max() > 1.0  # the model is not degenerate, so the tolerance means something
    assert float((a - b).abs().max()) <= rel * float(a.abs().max())
    if outtype == "f32":
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_q_and_k_are_permuted_the_way_llama_cpp_expects(exports, llama_dir):
    """llama.cpp rotates interleaved pairs: row (h, i, j) of HF's halves goes to (h, j, i)."""
    from gguf import GGUFReader

    model, _ = load_causal_lm(llama_dir)
    reader = GGUFReader(str(exports["f32"] / "model-f32.gguf"))
    data = {t.name: np.asarray(t.data) for t in reader.tensors}
    for gname, hf_w, n_head in (("blk.0.attn_q.weight", model.model.layers[0].self_attn.q_proj.weight, 4),
                                ("blk.0.attn_k.weight", model.model.layers[0].self_attn.k_proj.weight, 2)):
        w = hf_w.detach().numpy()
        half = w.shape[0] // n_head // 2
        g = data[gname]
        for h in range(n_head):
            for i in range(half):
                np.testing.assert_array_equal(g[h * 2 * half + 2 * i], w[h * 2 * half + i])
                np.testing.assert_array_equal(g[h * 2 * half + 2 * i + 1], w[h * 2 * half + half + i])
        assert not np.array_equal(g, w)
    np.testing.assert_array_equal(data["blk.0.attn_v.weight"], model.model.layers[0].self_attn.v_proj.weight.detach().numpy())


def test_modelfile_beside_the_gguf(exports):
    text = (exports["q8_0"] / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in text
    assert "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_qwen2_export_keeps_biases_and_untied_head(qwen2_dir, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    out = _export(qwen2_dir, tmp_path / "q", "gguf.outtype=f32")
    reader = GGUFReader(str(out / "model-f32.gguf"))
    names = {t.name for t in reader.tensors}
    assert {"output.weight", "blk.0.attn_q.bias", "blk.1.attn_v.bias"} <= names
    assert reader.fields["general.architecture"].contents() == "qwen2"
    model, tok = load_causal_lm(qwen2_dir)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model-f32.gguf", dtype=torch.float32)
    ids = tok(TEXT)["input_ids"]
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_unsupported_architecture_is_refused_and_nothing_written(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from homeforge.models.io import save_model_dir

    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    src = tmp_path / "gpt2"
    save_model_dir(AutoModelForCausalLM.from_config(cfg), tiny_tokenizer, src)
    with pytest.raises(HomeforgeError) as exc:
        _export(src, tmp_path / "out")
    assert "gpt2" in exc.value.what and "llama" in exc.value.fix and "qwen2" in exc.value.fix
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2"]


def test_failed_parity_writes_nothing(llama_dir, tmp_path):
    with pytest.raises(ParityError, match="parity check failed"):
        _export(llama_dir, tmp_path / "out", "gguf.outtype=q8_0", "parity.max_rel_error=1e-9")
    assert list(tmp_path.iterdir()) == []


def test_import_round_trip_equal_logits(exports, llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = import_gguf(exports["q8_0"] / "model-q8_0.gguf", tmp_path / "imported", load_config(ImportConfig))
    manifest = json.loads((out / "homeforge.json").read_text())
    assert manifest["stage"] == "import-gguf" and manifest["metrics"]["parity"]["passed"]
    assert manifest["metrics"]["source"]["tensor_types"] == {"F32": 5, "Q8_0": 15}
    imported, itok = load_causal_lm(out)
    original, tok = load_causal_lm(llama_dir)
    assert itok.chat_template == tok.chat_template
    assert itok.eos_token == tok.eos_token and itok.pad_token == tok.pad_token
    ids = tok(TEXT)["input_ids"]
    assert itok(TEXT)["input_ids"] == ids
    # equal to the dequantized GGUF, and close to the original (q8_0 rounding only)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(exports["q8_0"]), gguf_file="model-q8_0.gguf",
                                                      dtype=torch.float32)
    torch.testing.assert_close(logits(imported, ids), logits(gguf_model, ids), atol=1e-6, rtol=0)
    ref = logits(original, ids)
    assert float((logits(imported, ids) - ref).abs().max()) < 5e-2 * float(ref.abs().max())
    # and an f32 round trip is exact
    out32 = import_gguf(exports["f32"] / "model-f32.gguf", tmp_path / "imported32", load_config(ImportConfig))
    torch.testing.assert_close(logits(load_causal_lm(out32)[0], ids), logits(original, ids), atol=1e-6, rtol=0)


def test_import_rejects_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(HomeforgeError, match="not a readable GGUF"):
        import_gguf(bad, tmp_path / "out", load_config(ImportConfig))
    assert not (tmp_path / "out").exists()


def test_parity_line_prints_the_tolerance_as_given():
    from homeforge.export.common import parity_line

    line = parity_line("parity_int8", {"max_rel_error": 0.2, "tolerance": 0.25, "top1_agreement": 0.9})
    assert "(tolerance 0.25)" in line and "2e-01" not in line
    assert "(tolerance 0.0001)" in parity_line("p", {"max_rel_error": 0.0, "tolerance": 1e-4, "top1_agreement": 1.0})


def test_cli_export_gguf_and_import(llama_dir, tmp_path):
    import os
    import subprocess
    import sys

    exe = str(Path(sys.executable).with_name("homeforge"))
    r = subprocess.run([exe, "export", str(llama_dir), "--format", "gguf", "--outtype", "f16", "-o",
                        str(tmp_path / "g")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g" / "model-f16.gguf").is_file()
    no_llamacpp = {**os.environ, "HOMEFORGE_LLAMACPP": str(tmp_path / "no-llamacpp"), "PATH": os.path.dirname(exe)}
    r = subprocess.run([exe, "import", str(tmp_path / "g" / "model-f16.gguf"), "-o", str(tmp_path / "i")],
                       capture_output=True, text=True, timeout=300, env=no_llamacpp)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "i" / "model.safetensors").is_file()
    said = " ".join(r.stdout.split())
    assert "only the dequantized round trip was checked" in said and "not parity with the runtime" in said, said
    runtime = json.loads((tmp_path / "i" / "homeforge.json").read_text())["metrics"]["parity_llamacpp"]
    assert runtime == {"checked": False, "reason": "no llama.cpp build found (HOMEFORGE_LLAMACPP, docs/export.md)"}
    r = subprocess.run([exe, "export", str(tmp_path / "nope"), "--format", "gguf"], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in " ".join(r.stderr.split()) and "Traceback" not in r.stderr


def _with_pre(tok, pre):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_pre_tokenizer_named_as_llama_cpp_names_it(tiny_tokenizer, monkeypatch):
    from tokenizers import pre_tokenizers as pt

    from homeforge.export import pretok
    from homeforge.export.gguf import pre_tokenizer

    assert pre_tokenizer(tiny_tokenizer) == "gpt-2"  # GPT-2's regex: what `homeforge prepare` trains
    smol = _with_pre(tiny_tokenizer, pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]))
    assert pre_tokenizer(smol) == "smollm"  # SmolLM: single digits, then GPT-2's regex
    # a tokenizer the converter's table knows is named by its hash, whatever its definition says
    monkeypatch.setitem(pretok.KNOWN, pretok.check_hash(smol), "some-known-name")
    assert pre_tokenizer(smol) == "some-known-name"
    with pytest.raises(HomeforgeError, match="not one llama.cpp knows"):
        pre_tokenizer(_with_pre(tiny_tokenizer, pt.Sequence([pt.Whitespace(), pt.ByteLevel(use_regex=False)])))


@pytest.mark.parametrize("fixture,arch", [("qwen2moe_dir", "qwen2moe"), ("deepseek_v3_dir", "deepseek2")])
def test_moe_models_export_with_experts_and_mla(request, fixture, arch, tmp_path):
    """Qwen2-MoE and DeepSeek-V3 go out as llama.cpp's qwen2moe / deepseek2 (tensor layout: test_llamacpp_oracle)."""
    from gguf import GGUFReader

    src = request.getfixturevalue(fixture)
    for outtype, max_rel in (("f32", 1e-5), ("q8_0", 0.1)):  # q8_0 measured: 0.015 (qwen2moe), 0.022 (deepseek)
        out = _export(src, tmp_path / outtype, f"gguf.outtype={outtype}")
        m = json.loads((out / "homeforge.json").read_text())["metrics"]
        assert m["parity"]["passed"] and m["parity"]["tokenizer_equal"], m["parity"]
        assert m["parity"]["max_rel_error"] <= max_rel and "mapped back" in m["parity"]["loader"]
        reader = GGUFReader(str(out / f"model-{outtype}.gguf"))
        assert reader.fields["general.architecture"].contents() == arch
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.1.ffn_gate_inp.weight"] == "F32"  # the router stays f32, as llama.cpp's converter keeps it
        if outtype == "q8_0":
            assert types["blk.1.ffn_up_exps.weight"] == "Q8_0"
    if arch == "deepseek2":
        assert {"blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight", "blk.1.exp_probs_b.bias", "blk.0.ffn_up.weight"} <= set(types)
        assert reader.fields["deepseek2.expert_gating_func"].contents() == 2  # sigmoid
        assert reader.fields["deepseek2.attention.head_count_kv"].contents() == 1  # MLA as MQA


def test_import_keeps_the_gguf_pre_tokenizer(llama_dir, tiny_tokenizer, tmp_path):
    """A `smollm` GGUF (single digits split) imports with that split; transformers' loader alone merges digits."""
    from tokenizers import pre_tokenizers as pt
    from transformers import AutoTokenizer

    from homeforge.export.gguf import write_gguf

    model, _ = load_causal_lm(llama_dir)
    smol = _with_pre(tiny_tokenizer, pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]))
    for name in ("eos_token", "bos_token", "pad_token"):
        setattr(smol, name, getattr(tiny_tokenizer, name))
    (tmp_path / "g").mkdir()
    assert write_gguf(model, smol, tmp_path / "g" / "m.gguf", "f32", "smol")["pre"] == "smollm"
    text = "items 12345 and 6789 of x1y22"
    want = smol(text, add_special_tokens=False)["input_ids"]
    plain = AutoTokenizer.from_pretrained(str(tmp_path / "g"), gguf_file="m.gguf").backend_tokenizer.pre_tokenizer
    assert len(plain.pre_tokenize_str(" 12345")) == 1  # transformers' GGUF loader alone keeps the digits together
    out = import_gguf(tmp_path / "g" / "m.gguf", tmp_path / "imported", load_config(ImportConfig, overrides=["llamacpp_tokens=0"]))
    _, itok = load_causal_lm(out)
    assert itok(text, add_special_tokens=False)["input_ids"] == want
    assert len(itok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(" 12345")) == 6  # " ", then one per digit


# Ollama's Modelfile grammar (docs/modelfile.md in ollama/ollama): `INSTRUCTION arguments`, one per
# line, `#` comments; arguments a word, a "quoted string" or a """multi-line string"""
OLLAMA_INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
OLLAMA_PARAMETERS = {"mirostat", "mirostat_eta", "mirostat_tau", "num_ctx", "repeat_last_n", "repeat_penalty",
                     "temperature", "seed", "stop", "num_predict", "top_k", "top_p", "min_p"}
# the template variables Ollama documents (.System, .Prompt, .Response, .Messages[].Role/.Content, .Tools)
OLLAMA_FIELDS = {".System", ".Prompt", ".Response", ".Messages", ".Role", ".Content", ".Tools"}


def _parse_modelfile(text: str) -> list[tuple[str, str]]:
    import re

    out, i = [], 0
    lines = text.split("\n")
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        assert instr.upper() in OLLAMA_INSTRUCTIONS, f"unknown instruction {instr!r}"
        if rest.lstrip().startswith('"""'):
            body = rest.lstrip()[3:]
            while '"""' not in body:
                assert i < len(lines), 'unterminated """'
                body += "\n" + lines[i]
                i += 1
            value, _, after = body.partition('"""')
            assert not after.strip(), f"text after the closing quotes: {after!r}"
        else:
            value = rest.strip()
            assert value, f"{instr} without an argument"
            if value.startswith('"'):
                assert re.fullmatch(r'"(?:[^"\\]|\\.)*"', value) or instr.upper() == "PARAMETER", value
        out.append((instr.upper(), value))
    return out


def _check_go_template(tmpl: str) -> None:
    import re

    depth = 0
    for action in re.findall(r"\{\{-?\s*(.*?)\s*-?\}\}", tmpl, flags=re.S):
        word = action.split()[0] if action.split() else ""
        if word in ("if", "range", "with", "define", "block"):
            depth += 1
        elif word == "end":
            depth -= 1
            assert depth >= 0, "{{ end }} without an opening action"
        for field in re.findall(r"(?<![\w)])\.[A-Z]\w*", action):
            assert field in OLLAMA_FIELDS, f"{field} is not an Ollama template variable"
    assert depth == 0, "an {{ if/range }} is not closed"
    assert tmpl.count("{{") == tmpl.count("}}")


def test_modelfile_follows_ollama_grammar(exports):
    parsed = _parse_modelfile((exports["q8_0"] / "Modelfile").read_text())
    assert [v for k, v in parsed if k == "FROM"] == ["./model-q8_0.gguf"]
    for k, v in parsed:
        if k == "PARAMETER":
            name, _, value = v.partition(" ")
            assert name in OLLAMA_PARAMETERS and value, v
            if name == "stop":
                assert value.startswith('"') and value.endswith('"'), value
        if k == "TEMPLATE":
            _check_go_template(v)
    assert sum(k == "TEMPLATE" for k, _ in parsed) == 1
    with pytest.raises(AssertionError):  # the checker can fail
        _check_go_template("{{ if .System }}{{ .System }}")
    with pytest.raises(AssertionError):
        _parse_modelfile('FROM ./x.gguf\nTEMPLATE """{{ .Prompt }}')
