"""SmoothQuant for the int8-dynamic path: move activation outliers into the weights before quantizing.

A few input channels of a transformer's Linear layers carry activations 10-100x larger than
the rest; with one int8 scale per token those channels take the whole range and every other
channel is left with a handful of levels. SmoothQuant (Xiao et al., 2023) divides each input
channel ``j`` by ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)`` and multiplies the weight
columns by ``s_j``: the product is unchanged in exact arithmetic, and both sides become easy
to quantize. The division is folded into what produces the input, so nothing is added at run
time:

* ``input_layernorm`` -> q/k/v projections and ``post_attention_layernorm`` -> gate/up
  projections (an RMSNorm's weight scales its output channel-wise);
* ``up_proj`` -> ``down_proj`` (the MLP's input to ``down_proj`` is ``act(gate) * up``, linear
  in ``up``'s rows);
* ``v_proj`` -> ``o_proj`` (attention output is linear in ``v``; with grouped-query attention
  the query heads sharing one key/value head share the scale).

The maxima come from calibration text (the dataset's train split). The folded model is
checked against the original on that text: where the architecture does not behave as the
folding assumes (another norm, another MLP), the layer is left as it was.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def activation_maxima(model, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per Linear layer, the largest |input| of each input channel over ``batches`` of token ids."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return maxima


def _scales(a_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = a_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def _fold_into_columns(lins: list[nn.Linear], s: torch.Tensor) -> None:
    for lin in lins:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


def _fold_into_rows(prev: nn.Module, s: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` (an RMSNorm's weight, or a Linear's rows and bias)."""
    prev.weight.div_(s.to(prev.weight.dtype)[:, None] if prev.weight.dim() == 2 else s.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))


def groups(model) -> list[tuple[str, str, list[str]]]:
    """(kind, producer, [consumer Linear names]) for every decoder layer of a Llama-family model."""
    out = []
    for name, mod in model.named_modules():
        attn, mlp = getattr(mod, "self_attn", None), getattr(mod, "mlp", None)
        if attn is None or mlp is None:
            continue
        if all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj")) \
                and hasattr(mod, "input_layernorm"):
            out.append(("norm", f"{name}.input_layernorm", [f"{name}.self_attn.{p}" for p in ("q_proj", "k_proj",
                                                                                              "v_proj")]))
        if all(isinstance(getattr(mlp, p, None), nn.Linear) for p in ("gate_proj", "up_proj")) \
                and hasattr(mod, "post_attention_layernorm"):
            out.append(("norm", f"{name}.post_attention_layernorm", [f"{name}.mlp.gate_proj", f"{name}.mlp.up_proj"]))
        if isinstance(getattr(mlp, "up_proj", None), nn.Linear) and isinstance(getattr(mlp, "down_proj", None), nn.Linear):
            out.append(("linear", f"{name}.mlp.up_proj", [f"{name}.mlp.down_proj"]))
        if isinstance(getattr(attn, "v_proj", None), nn.Linear) and isinstance(getattr(attn, "o_proj", None), nn.Linear):
            out.append(("attention", f"{name}.self_attn.v_proj", [f"{name}.self_attn.o_proj"]))
    return out


@torch.no_grad()
def smooth(model, batches: list[torch.Tensor], alpha: float = 0.5, tolerance: float = 1e-3) -> dict:
    """Fold SmoothQuant scales into ``model`` in place; returns what was done for the manifest.

    Each fold is kept only if the model's logits on the first 64 calibration tokens stay within
    ``tolerance`` (relative, max-abs) of the original.
    """
    if not batches:
        return {"applied": False, "reason": "no calibration text"}
    modules = dict(model.named_modules())
    maxima = activation_maxima(model, batches)
    check = batches[0][:, :64]
    ref = model(check).logits.float()
    scale_ref = ref.abs().amax().clamp(min=1e-6)
    done, skipped = [], []
    for kind, producer, consumers in groups(model):
        if any(c not in maxima for c in consumers):
            continue
        prev, lins = modules[producer], [modules[c] for c in consumers]
        a_max = maxima[consumers[0]]
        s = _scales(a_max, [lin.weight for lin in lins], alpha)
        if kind == "attention":  # the attention module knows its head size and query heads per key/value head
            attn = modules[producer.rpartition(".")[0]]
            dim, rep = getattr(attn, "head_dim", None), getattr(attn, "num_key_value_groups", None)
            if not dim or not rep or s.numel() != prev.weight.shape[0] * rep:
                skipped.append(producer)
                continue
            s_kv = s.view(-1, rep, dim).amax(1)  # one scale per key/value channel, shared by its query heads
            s = s_kv[:, None, :].expand(-1, rep, dim).reshape(-1)
            s_prev = s_kv.reshape(-1)
        else:
            s_prev = s
        saved = {id(t): t.clone() for m in (prev, *lins) for t in m.parameters(recurse=False)}
        _fold_into_rows(prev, s_prev)
        _fold_into_columns(lins, s)
        err = float((model(check).logits.float() - ref).abs().amax() / scale_ref)
        if err > tolerance:  # the producer does not scale its output channel-wise: undo
            for m in (prev, *lins):
                for t in m.parameters(recurse=False):
                    t.copy_(saved[id(t)])
            skipped.append(producer)
        else:
            done.append(producer)
    return {"applied": bool(done), "alpha": alpha, "folded": len(done), "skipped": skipped,
            "calibration_tokens": int(sum(b.numel() for b in batches))}


def calibration_batches(texts: list[str], tok, samples: int, seq_len: int) -> list[torch.Tensor]:
    """Up to ``samples`` windows of ``seq_len`` tokens from ``texts`` (documents joined with EOS)."""
    ids: list[int] = []
    eos = getattr(tok, "eos_token_id", None)
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= samples * seq_len:
            break
    width = min(seq_len, len(ids))  # a text shorter than one window gives one shorter window
    n = min(samples, len(ids) // width) if width else 0
    return [torch.tensor([ids[i * width:(i + 1) * width]]) for i in range(n)]


LAYOUTS = ((True, ()), (True, ("down_proj",)), (False, ("down_proj",)))  # (head int8, kept fp32): fastest first


@torch.no_grad()
def int8_layout(model, batches: list[torch.Tensor], head: bool | None, keep: list[str] | None,
                min_agreement: float) -> dict:
    """The fastest (head int8?, layers kept fp32) layout whose per-token int8 model agrees with ``model``
    on the next-token argmax of ``batches`` at least ``min_agreement`` of the time, else the most accurate.

    A fixed ``head`` or ``keep`` (not None) is kept as given; the others are tried in ``LAYOUTS`` order.
    """
    import copy

    from homeforge.compress.quantize import linears_to_quantize
    from homeforge.models.quantized import quantize_int8, to_dynamic_int8

    ref = [model(b).logits.argmax(-1) for b in batches]
    candidates = list(dict.fromkeys((h if head is None else head, tuple(k) if keep is None else tuple(keep))
                                    for h, k in LAYOUTS))
    tried = []
    for h, k in candidates:
        m = copy.deepcopy(model)
        mods = dict(m.named_modules())
        to_dynamic_int8(m, {n: quantize_int8(mods[n].weight) for n in linears_to_quantize(m, h, k)})
        agree = torch.cat([(m(b).logits.argmax(-1) == r).flatten() for b, r in zip(batches, ref, strict=True)])
        tried.append({"quantize_head": h, "keep_fp32": list(k), "agreement": round(float(agree.float().mean()), 4)})
        del m
        if tried[-1]["agreement"] >= min_agreement:
            break
    chosen = next((t for t in tried if t["agreement"] >= min_agreement), max(tried, key=lambda t: t["agreement"]))
    return {**chosen, "min_agreement": min_agreement, "tried": tried}
