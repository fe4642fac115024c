"""Post-training quantization of a causal LM's Linear layers (the writer; the format and
its loader are in ``homeforge.models.quantized``)."""

from __future__ import annotations

from pathlib import Path

import torch

from homeforge.errors import HomeforgeError
from homeforge.models.q8 import BLOCK, quantize_q8
from homeforge.models.quantized import (
    FORMAT,
    METHODS,
    dequantize_weight,
    quantizable_linears,
    quantize_int4,
    quantize_int8,
)


def quantize_state_dict(model, method: str, group_size: int = 64, include_head: bool = False,
                        keep: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict to save for ``method``: quantized Linear weights replaced by qweight/scales.

    A quantized head tied to the embeddings gets its own int8 copy; the embeddings stay fp32.
    Layers named (or whose names end with a name) in ``keep`` stay fp32.
    """
    if method not in METHODS:
        raise HomeforgeError(f"unknown quantization method {method!r}", fix=f"choose one of: {', '.join(METHODS)}")
    if include_head and method not in ("int8-dynamic", "int8-block"):
        raise HomeforgeError(f"quantize_head is for int8-dynamic only (with {method} on a CPU the head would run "
                             "dequantized and, tied to the embeddings, save nothing)", fix="set quantize_head=false")
    names = linears_to_quantize(model, include_head, keep)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for name in names:
        w = sd.pop(f"{name}.weight")
        q, s = quantize(method, w, group_size, name)
        sd[f"{name}.qweight"] = q
        sd[f"{name}.scales"] = s.contiguous()
    return sd, names


def linears_to_quantize(model, include_head: bool = False, keep: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``quantizable_linears`` without the layers named (or whose names end with a name) in ``keep``."""
    return [n for n in quantizable_linears(model, include_head)
            if not any(n == k or n.endswith("." + k) for k in keep)]


def fake_quantized_weights(model, method: str, group_size: int = 64) -> dict[str, torch.Tensor]:
    """The fp32 weights the quantized model effectively uses (quantize -> dequantize)."""
    out = {}
    modules = dict(model.named_modules())
    for name in quantizable_linears(model):
        out[name] = dequantize_weight(method, *quantize(method, modules[name].weight, group_size))
    return out


def quantize(method: str, w: torch.Tensor, group_size: int = 64,
             name: str = "a Linear") -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales) of one weight (the layer ``name``) as ``method`` stores it."""
    if method == "int4-weight-only":
        return quantize_int4(w, group_size)
    if method == "int8-block":
        return quantize_q8(w, name)
    return quantize_int8(w)


# --------------------------------------------------------------------------- save / load


def save_quantized(model, tokenizer, out: str | Path, method: str, group_size: int = 64,
                   include_head: bool = False, keep: list[str] | tuple[str, ...] = ()) -> dict:
    """Write a quantized model directory into ``out`` (a temp dir of an artifact writer).

    Returns the ``quantization`` entry for homeforge.json.
    """
    from safetensors.torch import save_file

    from homeforge.models.io import save_model_dir

    out = Path(out)
    save_model_dir(model, tokenizer, out)  # config, tokenizer, generation config (and fp32 weights)
    for f in out.glob("*.safetensors*"):
        f.unlink()
    sd, names = quantize_state_dict(model, method, group_size, include_head, keep)
    sd = _untie(model, sd)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt", "homeforge_quantization": FORMAT})
    return {"format": FORMAT, "method": method, "bits": 4 if method.startswith("int4") else 8,
            "group_size": group_size if method.startswith("int4") else BLOCK if method == "int8-block" else None,
            "symmetric": True,
            "modules": names, "head_quantized": bool(include_head)}


def _untie(model, sd: dict) -> dict:
    """safetensors refuses shared storage: drop the tied output head (rebuilt by tie_weights)."""
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        for k in [k for k in sd if k.endswith(".weight") and head is not None]:
            if k.startswith("lm_head"):
                sd.pop(k)
    return sd


def linear_weight_bytes(path: str | Path) -> tuple[int, int]:
    """(bytes of the decoder's Linear weights incl. scales, bytes of everything) in a model
    dir's safetensors. Embeddings and the output head are not in the first figure."""
    from homeforge.security.storage import safetensors_header  # plain or encrypted files

    lin, total = 0, 0
    for f in Path(path).glob("*.safetensors"):
        for k, (dtype, shape) in safetensors_header(f).items():
            n = 1
            for d in shape:
                n *= d
            nbytes = n * _DTYPE_BYTES.get(dtype, 4)
            total += nbytes
            if "embed" in k or k.startswith("lm_head."):  # embeddings and the output head: counted apart
                continue
            if k.endswith((".qweight", ".scales")) or (k.endswith(".weight") and len(shape) == 2):
                lin += nbytes
    return lin, total


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "F64": 8, "BOOL": 1}
