"""What differs per architecture in a GGUF file: hyperparameter keys and tensor layout.

Each architecture is written the way llama.cpp's ``convert_hf_to_gguf.py`` writes it (the
converter-oracle test compares both files key by key and byte by byte):

- ``llama``: Q and K rows permuted from transformers' rotate-half layout to llama.cpp's
  interleaved pairs (transformers' GGUF loader reverses it).
- ``qwen2``: no permutation (llama.cpp runs Qwen2 with the "neox" rotary layout).
- ``qwen2_moe`` -> ``qwen2moe``: transformers' fused ``experts.gate_up_proj [E, 2F, H]`` is
  split into ``ffn_gate_exps`` / ``ffn_up_exps``, ``experts.down_proj`` is ``ffn_down_exps``;
  the router (``ffn_gate_inp``) and the shared expert's gate stay f32 in every outtype.
- ``deepseek_v3`` -> ``deepseek2``: multi-head latent attention as llama.cpp runs it, an MQA with
  one KV head of width ``kv_lora_rank + qk_rope_head_dim``: ``kv_b_proj`` is split per head into
  ``attn_k_b`` (transposed) and ``attn_v_b``; the router's ``e_score_correction_bias`` is
  ``exp_probs_b.bias``; the router is sigmoid (``expert_gating_func``), as transformers' is.

``from_gguf_state`` undoes these transforms, so a written file can be loaded back into the
transformers model for a logits check where transformers' own GGUF loader cannot read the
architecture (it has no ``deepseek2``, and its ``qwen2moe`` loader fails on fused experts).
"""

from __future__ import annotations

import numpy as np

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen2_moe": "qwen2moe", "deepseek_v3": "deepseek2"}
SUPPORTED = {"llama": "LlamaForCausalLM (the built-in presets, Llama, SmolLM, Mistral-style)",
             "qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM (llama.cpp's qwen2moe)",
             "deepseek_v3": "DeepseekV3ForCausalLM (llama.cpp's deepseek2, MLA + MoE)"}
MOE = ("qwen2_moe", "deepseek_v3")


def rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def problems(config) -> list[str]:
    """What of this (supported) architecture's config llama.cpp would run differently."""
    arch = config.model_type
    out = []
    if rope_type(config) != "default":
        out.append(f"rope scaling {rope_type(config)!r} (only plain rotary embeddings are written)")
    if getattr(config, "hidden_act", "silu") != "silu":
        out.append(f"activation {config.hidden_act!r} (llama.cpp's {GGUF_ARCH[arch]} uses silu)")
    if arch == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        out.append("attention/MLP biases (llama.cpp's llama architecture has none)")
    if arch in ("qwen2", "qwen2_moe") and getattr(config, "use_sliding_window", False):
        out.append("sliding-window attention")
    if arch == "qwen2_moe":
        if getattr(config, "norm_topk_prob", False):
            out.append("norm_topk_prob=true (llama.cpp's qwen2moe does not renormalise the top-k weights)")
        if getattr(config, "decoder_sparse_step", 1) != 1 or getattr(config, "mlp_only_layers", None):
            out.append("dense layers between the MoE layers (decoder_sparse_step / mlp_only_layers)")
    if arch == "deepseek_v3":
        if not getattr(config, "rope_interleave", True):
            out.append("rope_interleave=false (llama.cpp's deepseek2 rotates interleaved pairs)")
        if getattr(config, "scoring_func", "sigmoid") != "sigmoid":
            out.append(f"scoring_func {config.scoring_func!r} (transformers' DeepSeek-V3 router is sigmoid)")
        if getattr(config, "attention_bias", False):
            out.append("attention biases")
    return out


def write_hparams(w, config) -> None:
    """The ``{arch}.*`` keys the converter writes for this architecture."""
    import gguf

    arch = config.model_type
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_freq_base(rope_theta(config))
    if arch in ("llama", "qwen2"):
        w.add_head_count_kv(int(config.num_key_value_heads))
        w.add_rope_dimension_count(head_dim(config))
        w.add_key_length(head_dim(config))
        w.add_value_length(head_dim(config))
        w.add_vocab_size(int(config.vocab_size))
    elif arch == "qwen2_moe":
        w.add_head_count_kv(int(config.num_key_value_heads))
        w.add_expert_count(int(config.num_experts))
        w.add_expert_used_count(int(config.num_experts_per_tok))
        w.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        w.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
    elif arch == "deepseek_v3":
        kv_lora, rope_dim = int(config.kv_lora_rank), int(config.qk_rope_head_dim)
        w.add_head_count_kv(1)  # MLA runs as MQA over the compressed KV
        w.add_expert_count(int(config.n_routed_experts))
        w.add_expert_used_count(int(config.num_experts_per_tok))
        w.add_expert_group_count(int(config.n_group))
        w.add_expert_group_used_count(int(config.topk_group))
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_key_length(kv_lora + rope_dim)
        w.add_value_length(kv_lora)
        w.add_leading_dense_block_count(int(config.first_k_dense_replace))
        w.add_vocab_size(int(config.vocab_size))
        if config.q_lora_rank is not None:
            w.add_q_lora_rank(int(config.q_lora_rank))
        w.add_kv_lora_rank(kv_lora)
        w.add_key_length_mla(int(config.qk_nope_head_dim) + rope_dim)
        w.add_value_length_mla(int(config.v_head_dim))
        w.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        w.add_expert_shared_count(int(config.n_shared_experts or 0))
        w.add_expert_weights_scale(float(config.routed_scaling_factor))
        if getattr(config, "norm_topk_prob", False):
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(rope_dim)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half Q/K rows -> llama.cpp interleaved pairs (convert_hf_to_gguf.py's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(model):
    """Yield (name for gguf's tensor-name map, HF state-dict name, fp32 array in llama.cpp's layout)."""
    import torch

    config = model.config
    arch = config.model_type
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        arr = tensor.detach().to(torch.float32).numpy()
        base = hf_name.removesuffix(".weight")
        if hf_name.endswith("mlp.experts.gate_up_proj"):
            ff = arr.shape[1] // 2
            yield hf_name.replace("gate_up_proj", "gate_proj.weight"), hf_name, np.ascontiguousarray(arr[:, :ff])
            yield hf_name.replace("gate_up_proj", "up_proj.weight"), hf_name, np.ascontiguousarray(arr[:, ff:])
        elif hf_name.endswith("mlp.experts.down_proj"):
            yield hf_name + ".weight", hf_name, arr
        elif hf_name.endswith("mlp.gate.e_score_correction_bias"):
            yield hf_name.replace("e_score_correction_bias", "e_score_correction.bias"), hf_name, arr
        elif arch == "deepseek_v3" and base.endswith("self_attn.kv_b_proj"):
            nope, v = int(config.qk_nope_head_dim), int(config.v_head_dim)
            kv_b = arr.reshape(config.num_attention_heads, nope + v, arr.shape[-1])
            yield hf_name.replace("kv_b_proj", "k_b_proj"), hf_name, np.ascontiguousarray(kv_b[:, :nope].swapaxes(1, 2))
            yield hf_name.replace("kv_b_proj", "v_b_proj"), hf_name, np.ascontiguousarray(kv_b[:, nope:])
        else:
            if arch == "llama" and base.endswith("self_attn.q_proj") and hf_name.endswith(".weight"):
                arr = _permute(arr, config.num_attention_heads)
            elif arch == "llama" and base.endswith("self_attn.k_proj") and hf_name.endswith(".weight"):
                arr = _permute(arr, config.num_key_value_heads)
            yield hf_name, hf_name, arr


def from_gguf_state(arrays: dict[str, np.ndarray], hf_names: dict[str, str], config) -> dict[str, np.ndarray]:
    """Undo ``hf_tensors``: {gguf tensor name: dequantized array} -> HF state dict (numpy)."""
    arch = config.model_type
    parts: dict[str, dict[str, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    for gname, arr in arrays.items():
        hf = hf_names[gname]
        if hf.endswith("mlp.experts.gate_up_proj") or (arch == "deepseek_v3" and hf.endswith("self_attn.kv_b_proj.weight")):
            kind = gname.split(".")[-2]
            parts.setdefault(hf, {})[kind] = arr
            continue
        if arch == "llama" and hf.endswith("self_attn.q_proj.weight"):
            arr = _unpermute(arr, config.num_attention_heads)
        elif arch == "llama" and hf.endswith("self_attn.k_proj.weight"):
            arr = _unpermute(arr, config.num_key_value_heads)
        out[hf] = arr
    for hf, p in parts.items():
        if hf.endswith("gate_up_proj"):
            out[hf] = np.concatenate([p["ffn_gate_exps"], p["ffn_up_exps"]], axis=1)
        else:
            kv = np.concatenate([p["attn_k_b"].swapaxes(1, 2), p["attn_v_b"]], axis=1)
            out[hf] = kv.reshape(-1, kv.shape[-1])
    return out


def force_f32(gguf_name: str) -> bool:
    """Tensors the converter keeps in f32 whatever the outtype: norms, biases, MoE routers."""
    base = gguf_name.rsplit(".", 1)[0]
    return (gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")
            or base.endswith((".ffn_gate_inp", ".ffn_gate_inp_shexp")))
