"""HF export: reloads in transformers with equal logits; a LoRA adapter is merged; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from homeforge.config import ExportConfig, load_config
from homeforge.errors import HomeforgeError
from homeforge.export import run_export
from homeforge.models.io import load_causal_lm

from .conftest import logits

TEXT = "Return the number of items in the container."


def _export(src, out, *overrides):
    return run_export(src, out, load_config(ExportConfig, overrides=["format=hf", *overrides]))


def test_hf_export_reloads_with_equal_logits(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _export(llama_dir, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)  # plain transformers, no homeforge
    tok = AutoTokenizer.from_pretrained(str(out))
    original, otok = load_causal_lm(llama_dir)
    ids = otok(TEXT)["input_ids"]
    assert tok(TEXT)["input_ids"] == ids
    assert tok.chat_template == otok.chat_template and "<|im_start|>" in tok.chat_template
    assert torch.equal(logits(model, ids), logits(original, ids))
    parity = json.loads((out / "homeforge.json").read_text())["metrics"]["parity"]
    assert parity["passed"] and parity["max_abs_diff"] == 0.0 and parity["tokenizer_equal"]


def test_hf_export_bf16_halves_the_weights(llama_dir, tmp_path):
    from safetensors import safe_open

    out = _export(llama_dir, tmp_path / "bf16", "hf.dtype=bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    parity = json.loads((out / "homeforge.json").read_text())["metrics"]["parity"]
    assert 0 < parity["max_rel_error"] <= parity["tolerance"]


@pytest.fixture(scope="module")
def adapter_dir(llama_dir, tmp_path_factory):
    """A PEFT LoRA adapter with random (non-zero) A and B, saved the way peft saves it."""
    from peft import LoraConfig, get_peft_model

    base, tok = load_causal_lm(llama_dir)
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(llama_dir)
    return out


def test_lora_adapter_is_merged_into_its_base(adapter_dir, llama_dir, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    out = _export(adapter_dir, tmp_path / "merged")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("lora" in k for k in keys) and "model.layers.0.self_attn.q_proj.weight" in keys
    merged, tok = load_causal_lm(out)
    base, _ = load_causal_lm(llama_dir)
    ids = tok(TEXT)["input_ids"]
    base_logits = logits(base, ids)
    peft_logits = logits(PeftModel.from_pretrained(load_causal_lm(llama_dir)[0], str(adapter_dir)).eval(), ids)
    torch.testing.assert_close(logits(merged, ids), peft_logits, atol=1e-4, rtol=0)
    assert float((peft_logits - base_logits).abs().max()) > 0.1  # the adapter really changes the model
    manifest = json.loads((out / "homeforge.json").read_text())
    assert manifest["lora_merged"]["r"] == 4 and set(manifest["inputs"]) == {"model", "base_model"}


def test_lora_adapter_without_a_local_base_says_how_to_fix(adapter_dir, tmp_path):
    import shutil

    moved = tmp_path / "adapter"
    shutil.copytree(adapter_dir, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(HomeforgeError) as exc:
        _export(moved, tmp_path / "out")
    assert "not a local directory" in exc.value.what and "base_model" in exc.value.fix
    assert not (tmp_path / "out").exists()


def test_model_without_tokenizer_is_refused_and_nothing_written(llama_dir, tmp_path):
    import shutil

    src = tmp_path / "notok"
    shutil.copytree(llama_dir, src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    for fmt in ("hf", "gguf", "onnx"):
        with pytest.raises(HomeforgeError, match="no tokenizer"):
            run_export(src, tmp_path / fmt, load_config(ExportConfig, overrides=[f"format={fmt}"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notok"]


def test_an_up_to_date_export_is_skipped(llama_dir, tmp_path):
    out = _export(llama_dir, tmp_path / "hf")
    before = (out / "homeforge.json").stat().st_mtime_ns
    _export(llama_dir, tmp_path / "hf")
    assert (out / "homeforge.json").stat().st_mtime_ns == before
