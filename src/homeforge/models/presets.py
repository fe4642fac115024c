"""Built-in architecture presets, built from transformers' own classes.

Dense presets are Llama-architecture (``LlamaForCausalLM``); sizes are given for a
vocabulary of 8192 with tied embeddings. ``debug`` exists so tests run in seconds.

Mixture-of-experts presets (``moe-debug``, ``moe-tiny``, ``moe-small``) are Qwen2-MoE
architecture (``Qwen2MoeForCausalLM``): every layer has ``num_experts`` routed experts of
which ``num_experts_per_tok`` (top-k) run per token, plus one always-on shared expert. The
router's load-balancing loss (Switch-style, ``router_aux_loss_coef``) is added to the
training loss and logged. ``deepseek-debug`` is a tiny DeepSeek-V3 (multi-head latent
attention, sigmoid router with a correction bias, first layer dense). Change experts or
top-k with ``model.overrides``, e.g. ``{num_experts: 16, num_experts_per_tok: 4}``.
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

# MoE presets: "arch" picks the transformers config class (see ARCHES)
_MOE = dict(arch="qwen2_moe", tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=0.01,
            norm_topk_prob=True, decoder_sparse_step=1)
PRESETS.update({
    "moe-debug": dict(_MOE, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "moe-tiny": dict(_MOE, hidden_size=256, intermediate_size=704, moe_intermediate_size=176,
                     shared_expert_intermediate_size=352, num_experts=8, num_experts_per_tok=2, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
    "moe-small": dict(_MOE, hidden_size=512, intermediate_size=1408, moe_intermediate_size=352,
                      shared_expert_intermediate_size=704, num_experts=16, num_experts_per_tok=2, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
    "deepseek-debug": dict(arch="deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                           num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
                           q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                           routed_scaling_factor=1.0, max_position_embeddings=256, tie_word_embeddings=True),
})

COMMON = dict(rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", attention_dropout=0.0,
              initializer_range=0.02, use_cache=True)


def preset_config(name: str, vocab_size: int, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                  pad_token_id: int | None = None, overrides: dict[str, Any] | None = None):
    """A transformers config for preset ``name`` with the given vocabulary and special tokens."""
    from transformers import DeepseekV3Config, LlamaConfig, Qwen2MoeConfig

    if name not in PRESETS:
        raise HomeforgeError(f"unknown model preset {name!r}", fix=f"choose one of: {', '.join(PRESETS)}")
    fields = {**COMMON, **PRESETS[name], **(overrides or {})}
    arch = fields.pop("arch", "llama")
    cls = {"llama": LlamaConfig, "qwen2_moe": Qwen2MoeConfig, "deepseek_v3": DeepseekV3Config}[arch]
    if arch != "llama":
        _check_moe_fields(name, fields)
    return cls(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
               pad_token_id=pad_token_id, **fields)


def _check_moe_fields(name: str, fields: dict[str, Any]) -> None:
    experts = fields.get("num_experts", fields.get("n_routed_experts"))
    top_k = fields.get("num_experts_per_tok")
    if experts is not None and top_k is not None and not 1 <= top_k <= experts:
        raise HomeforgeError(f"preset {name!r}: num_experts_per_tok={top_k} must be between 1 and the number of "
                             f"experts ({experts})", fix="lower model.overrides.num_experts_per_tok or add experts")


def build_model(config, seed: int | None = None):
    """Instantiate a randomly initialised causal LM from a transformers config, in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from homeforge.runtime import seeded

    with seeded(seed):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def count_params(model, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n
