"""Model presets, HF directories, tokenizer, logits parity with transformers (golden losses: tests/train)."""

import pytest
import torch

from homeforge.models.presets import PRESETS, build_model, count_params, preset_config


def test_tokenizer_round_trip(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    text = "Return the number of items.\n  Indented — ünïcode 中文 tabs\tand emoji 🙂"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text  # byte-level: lossless on any text
    tiny_tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again.encode(text, add_special_tokens=False) == ids
    assert again.eos_token == "<|endoftext|>" and again.pad_token == "<|pad|>"
    chat = again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_presets_build_and_sizes():
    sizes = {}
    for name in ("debug", "tiny", "small"):
        model = build_model(preset_config(name, 8192), seed=0)
        sizes[name] = count_params(model)
        assert type(model).__name__ == "LlamaForCausalLM"
    assert sizes["debug"] < sizes["tiny"] < sizes["small"]
    assert 20e6 < sizes["small"] < 40e6
    assert set(PRESETS) >= {"debug", "tiny", "small", "124m"}


def test_saved_dir_loads_in_transformers_with_equal_logits(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from homeforge.models.io import save_model_dir

    tok = tiny_tokenizer
    model = build_model(preset_config("debug", len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id), seed=3).eval()
    save_model_dir(model, tok, tmp_path)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / f).is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ids = hf_tok("Return the number of items", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_load_missing_model_dir_is_clear(tmp_path):
    from homeforge.errors import HomeforgeError
    from homeforge.models.io import load_causal_lm

    with pytest.raises(HomeforgeError, match="does not exist"):
        load_causal_lm(tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HomeforgeError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")




def test_wrong_kind_of_directory_says_what_it_is_and_what_to_run(tmp_path):
    """A LoRA adapter, a GGUF, an ONNX export or a classifier passed where a causal LM is needed."""
    import json

    from transformers import LlamaForSequenceClassification

    from homeforge.errors import HomeforgeError
    from homeforge.models.io import check_model_dir, load_causal_lm

    (tmp_path / "lora" / "adapter").mkdir(parents=True)
    (tmp_path / "lora" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(HomeforgeError, match="LoRA adapter") as e:
        check_model_dir(tmp_path / "lora")
    assert "--format hf --base" in e.value.fix
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "m-q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(HomeforgeError, match="GGUF") as e:
        check_model_dir(tmp_path / "gguf")
    assert "homeforge import" in e.value.fix
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(HomeforgeError, match="ONNX export") as e:
        check_model_dir(tmp_path / "onnx")
    assert "homeforge serve" in e.value.fix
    cfg = preset_config("debug", 64)
    cfg.num_labels = 2
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "cls")
    with pytest.raises(HomeforgeError, match="sequence classifier"):
        load_causal_lm(tmp_path / "cls", with_tokenizer=False)
