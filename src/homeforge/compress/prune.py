"""Pruning: unstructured magnitude pruning and structured head / MLP-channel removal.

Unstructured pruning zeroes the smallest-magnitude weights of every Linear layer (each
layer to the target sparsity); the saved model has the same shapes, so it is smaller
only after compression of the file or with sparse kernels. Structured pruning removes
whole key/value head groups (with their query heads) and MLP intermediate channels,
ranked by weight norms, and writes a smaller config: a plain, smaller HF model.
"""

from __future__ import annotations

import copy

import torch

from homeforge.errors import HomeforgeError
from homeforge.models.quantized import quantizable_linears, skip_init

STRUCTURED_ARCHS = ("llama", "qwen2", "mistral", "qwen3")


@torch.no_grad()
def prune_unstructured(model, sparsity: float) -> dict:
    """Zero the ``sparsity`` fraction of smallest |w| in each quantizable Linear (in place)."""
    modules = dict(model.named_modules())
    zeros = total = 0
    for name in quantizable_linears(model):
        w = modules[name].weight
        k = int(round(sparsity * w.numel()))
        if k > 0:
            thresh = w.abs().flatten().kthvalue(k).values
            mask = w.abs() > thresh
            # ties at the threshold: keep exactly numel - k weights
            extra = int(mask.numel() - mask.sum()) - k
            if extra > 0:
                tied = ((w.abs() == thresh) & ~mask).flatten().nonzero().squeeze(1)[:extra]
                mask.view(-1)[tied] = True
            w.mul_(mask)
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"linear_sparsity": zeros / total if total else 0.0, "linear_weights": total}


def linear_sparsity(model) -> float:
    modules = dict(model.named_modules())
    ws = [modules[n].weight for n in quantizable_linears(model)]
    return float(sum(int((w == 0).sum()) for w in ws) / max(1, sum(w.numel() for w in ws)))


def _check_arch(model) -> None:
    mt = getattr(model.config, "model_type", "")
    layers = getattr(getattr(model, "model", None), "layers", None)
    ok = mt in STRUCTURED_ARCHS and layers is not None and all(
        hasattr(layer, "mlp") and all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))
        for layer in layers)
    if not ok:
        raise HomeforgeError(f"structured pruning does not support the {mt!r} architecture",
                             fix=f"supported: {', '.join(STRUCTURED_ARCHS)} (dense attention + gated MLP); "
                             "use prune.kind=unstructured, or a quantization method")


@torch.no_grad()
def prune_structured(model, mlp_keep: float, heads_keep: float):
    """A new, smaller model keeping the most important MLP channels and KV head groups.

    Importance of MLP channel j: ||gate_j|| * ||up_j|| * ||down[:, j]||. Importance of KV
    group g: summed norms of its k, v rows, its query heads' q rows and o columns. The same
    number is kept in every layer (HF configs have one size per model).
    """
    from transformers import AutoModelForCausalLM

    _check_arch(model)
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    per_group = n_heads // n_kv
    inter = cfg.intermediate_size
    keep_ch = max(1, int(round(inter * mlp_keep)))
    keep_g = max(1, int(round(n_kv * heads_keep)))
    new_cfg = copy.deepcopy(cfg)
    new_cfg.intermediate_size = keep_ch
    new_cfg.num_key_value_heads = keep_g
    new_cfg.num_attention_heads = keep_g * per_group
    new_cfg.head_dim = head_dim
    with skip_init():  # every tensor is copied below (and checked)
        new = AutoModelForCausalLM.from_config(new_cfg, dtype=torch.float32).eval()
    sd_new = {}
    sd = model.state_dict()
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        mlp = layer.mlp
        score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
        ch = score.topk(keep_ch).indices.sort().values
        for p in ("gate_proj", "up_proj"):
            sd_new[f"{pre}mlp.{p}.weight"] = getattr(mlp, p).weight[ch].clone()
        sd_new[f"{pre}mlp.down_proj.weight"] = mlp.down_proj.weight[:, ch].clone()
        at = layer.self_attn
        q = at.q_proj.weight.view(n_kv, per_group * head_dim, -1)
        k = at.k_proj.weight.view(n_kv, head_dim, -1)
        v = at.v_proj.weight.view(n_kv, head_dim, -1)
        o = at.o_proj.weight.view(-1, n_kv, per_group * head_dim)
        gscore = (q.flatten(1).norm(dim=1) + k.flatten(1).norm(dim=1) + v.flatten(1).norm(dim=1)
                  + o.permute(1, 0, 2).flatten(1).norm(dim=1))
        g = gscore.topk(keep_g).indices.sort().values
        sd_new[f"{pre}self_attn.q_proj.weight"] = q[g].reshape(-1, q.shape[-1]).clone()
        sd_new[f"{pre}self_attn.k_proj.weight"] = k[g].reshape(-1, k.shape[-1]).clone()
        sd_new[f"{pre}self_attn.v_proj.weight"] = v[g].reshape(-1, v.shape[-1]).clone()
        sd_new[f"{pre}self_attn.o_proj.weight"] = o[:, g].reshape(o.shape[0], -1).clone()
        for p, rows in (("q_proj", per_group * head_dim), ("k_proj", head_dim), ("v_proj", head_dim)):
            bias = getattr(at, p).bias
            if bias is not None:
                sd_new[f"{pre}self_attn.{p}.bias"] = bias.view(n_kv, rows)[g].reshape(-1).clone()
        if at.o_proj.bias is not None:
            sd_new[f"{pre}self_attn.o_proj.bias"] = at.o_proj.bias.clone()
    for key, t in sd.items():
        if key not in sd_new and key in new.state_dict() and new.state_dict()[key].shape == t.shape:
            sd_new.setdefault(key, t.clone())
    result = new.load_state_dict(sd_new, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and new_cfg.tie_word_embeddings)]
    if missing:
        raise HomeforgeError(f"structured pruning could not map {len(missing)} tensors (e.g. {missing[0]})",
                             fix="this architecture variant is not supported; use prune.kind=unstructured")
    new.tie_weights()
    stats = {"intermediate_size": [inter, keep_ch], "num_key_value_heads": [n_kv, keep_g],
             "num_attention_heads": [n_heads, new_cfg.num_attention_heads],
             "params": [sum(p.numel() for p in model.parameters()), sum(p.numel() for p in new.parameters())]}
    return new, stats


