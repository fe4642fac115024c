"""Built-in architecture presets, built from transformers' own classes.

Dense presets are Llama-architecture (``LlamaForCausalLM``); sizes are given for a
vocabulary of 8192 with tied embeddings. ``debug`` exists so tests run in seconds.
"""

from __future__ import annotations

from typing import Any

from homeforge.errors import HomeforgeError

# name -> LlamaConfig fields (vocab_size comes from the tokenizer)
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=True),
    "124m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, max_position_embeddings=2048, tie_word_embeddings=True),
}

COMMON = dict(rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", attention_dropout=0.0,
              initializer_range=0.02, use_cache=True)


def preset_config(name: str, vocab_size: int, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                  pad_token_id: int | None = None, overrides: dict[str, Any] | None = None):
    """A transformers config for preset ``name`` with the given vocabulary and special tokens."""
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise HomeforgeError(f"unknown model preset {name!r}", fix=f"choose one of: {', '.join(PRESETS)}")
    fields = {**COMMON, **PRESETS[name], **(overrides or {})}
    return LlamaConfig(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, **fields)


def build_model(config, seed: int | None = None):
    """Instantiate a randomly initialised causal LM from a transformers config, in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def count_params(model, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n
