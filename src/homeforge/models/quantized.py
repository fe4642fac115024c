"""The quantized-model storage format (written by ``homeforge compress``) and its runtime.

Storage (a homeforge model directory, loadable by ``models.io.load_causal_lm``):

* ``config.json`` is the original architecture's config, unchanged;
* ``model.safetensors`` holds every tensor of the model except the weights of the
  quantized Linear layers, which are replaced by ``NAME.qweight`` (int8: one value per
  weight; int4: two values per uint8, low nibble first) and ``NAME.scales`` (float32,
  per output channel for int8-dynamic and the weight-only int8, per output channel and block
  of 32 inputs for int8-block, per output channel and group of ``group_size`` inputs for
  int4). Quantization is symmetric: ``w = q * scale``;
* ``homeforge.json`` carries a ``quantization`` entry: method, bits, group size, the
  list of quantized modules and the runtime backend.

Runtime: which kernels run the model is chosen at load time for the hardware at hand.

* ``int8-dynamic`` on a CPU: :class:`Int8Linear`, weights int8 per output channel,
  activations quantized to int8 per row (token) at each call, int32 accumulation with
  ``torch._int_mm`` (oneDNN). On CUDA: torchao int8 dynamic, if installed.
* ``int8-block`` on a CPU: :class:`homeforge.models.q8.Q8Linear`, llama.cpp's q8_0
  arithmetic (int8 weights and activations, one scale per 32 inputs; ``scales`` is
  ``[N, K/32]``), with homeforge's own kernel (models/q8_kernel.cpp). On CUDA the weights
  are dequantized to fp32 at load.
* ``int8-weight-only`` / ``int4-weight-only``: on CUDA, torchao's weight-only kernels.
  On a CPU the aten int8/int4 weight-only matmuls measured 10-30x *slower* than fp32 here,
  so the weights are dequantized to fp32 at load: the model is 4x/7x smaller on disk and
  in transit, runs at fp32 speed, with the quality of weight-only quantization.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from homeforge.errors import HomeforgeError
from homeforge.models.qlinear import QuantizedLinear

METHODS = ("int8-dynamic", "int8-block", "int8-weight-only", "int4-weight-only")
FORMAT = "homeforge-quant-v1"


# --------------------------------------------------------------------------- math


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (q int8 [N, K], scales float32 [N])."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def dequantize_weight(method: str, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight a stored (qweight, scales) pair of ``method`` stands for."""
    if method == "int4-weight-only":
        return dequantize_int4(q, scales)
    if method == "int8-block":
        from homeforge.models.q8 import dequantize_q8

        return dequantize_q8(q, scales)
    return dequantize_int8(q, scales)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise int4 in [-8, 7]: returns (packed uint8 [N, K/2], scales [N, K/group])."""
    w = w.detach().float()
    n, k = w.shape
    if k % group_size or group_size % 2:
        raise HomeforgeError(f"int4 group size {group_size} does not divide the input width {k}",
                             fix="choose a group size that divides every Linear's input width, e.g. 32 or 64")
    g = w.reshape(n, k // group_size, group_size)
    scales = (g.abs().amax(dim=-1) / 7.0).clamp(min=1e-12)
    q = torch.round(g / scales[..., None]).clamp(-8, 7).to(torch.int16).reshape(n, k)
    u = (q + 8).to(torch.uint8)  # 0..15
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    return packed.contiguous(), scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    lo = (packed & 0x0F).to(torch.int16) - 8
    hi = (packed >> 4).to(torch.int16) - 8
    q = torch.stack([lo, hi], dim=-1).reshape(n, half * 2).float()
    groups = scales.shape[1]
    return (q.reshape(n, groups, -1) * scales.float()[..., None]).reshape(n, half * 2)


def quantizable_linears(model, include_head: bool = False) -> list[str]:
    """Names of the Linear layers to quantize: every nn.Linear of the decoder, plus the
    output head with ``include_head``. Sequence-classification heads always stay fp32.

    By default the head stays in full precision: in the presets it is tied to the
    embeddings, and it carries much of the quantization error (SmolLM2-135M int8-dynamic:
    top-1 agreement with fp32 0.966 with the head fp32, 0.926 with it int8). Quantizing it
    (a separate int8 copy; the embedding table stays fp32) measured 1.3-1.6x more speed on
    the `small` preset, whose 8192-token head is ~14% of the FLOPs: ``quantize_head``.
    """
    head = model.get_output_embeddings()
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
             and name.rpartition(".")[2] not in CLASSIFIER_HEADS]
    if include_head and isinstance(head, nn.Linear):
        names += [name for name, m in model.named_modules() if m is head][:1]
    return names


CLASSIFIER_HEADS = ("score", "classifier")  # sequence-classification heads stay in full precision




def read_quantization(path: str | Path) -> dict | None:
    """The ``quantization`` entry of a model directory's homeforge.json, or None."""
    mf = Path(path) / "homeforge.json"
    if not mf.is_file():
        return None
    try:
        return json.loads(mf.read_text(encoding="utf-8")).get("quantization")
    except (OSError, json.JSONDecodeError):
        return None


def load_quantized(path: str | Path, qinfo: dict, device: str | None = None, dequantize: bool = False):
    """Rebuild a quantized model directory as a runnable model for this hardware.

    With ``dequantize`` the result is a plain fp32 model holding the dequantized weights
    (for exporters and other tools that need ordinary nn.Linear layers).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    p = Path(path)
    if qinfo.get("format") != FORMAT or qinfo.get("method") not in METHODS:
        raise HomeforgeError(f"{p} holds a quantized model in a format this homeforge does not know ({qinfo.get('format')}, "
                             f"{qinfo.get('method')})", where=str(p), fix="upgrade homeforge or re-run `homeforge compress`")
    config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    method = qinfo["method"]
    names = qinfo["modules"]
    if dequantize and "lm_head" in names and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # the head gets its own (dequantized int8) weights
    with skip_init():  # every tensor is loaded below (and checked), so random init would be wasted time
        model = (AutoModelForSequenceClassification if classifier else AutoModelForCausalLM).from_config(
            config, dtype=torch.float32)
    from homeforge.security.storage import load_safetensors  # plain or encrypted

    sd = load_safetensors(p / "model.safetensors")
    use_cuda = (device or "cpu").startswith("cuda")
    # on a CPU the int8 methods swap these layers for int8 modules below: their fp32 weights are never
    # filled (their pages never touched), which keeps the load's peak memory near the int8 model's
    int8_cpu = not dequantize and not use_cuda and method in ("int8-dynamic", "int8-block")
    qtensors = {}
    for name in names:
        try:
            q, s = sd.pop(f"{name}.qweight"), sd.pop(f"{name}.scales")
        except KeyError:
            raise HomeforgeError(f"{p}/model.safetensors lacks the quantized weights of {name}", where=str(p),
                                 fix="the directory is damaged; re-run `homeforge compress`") from None
        qtensors[name] = (q, s)
        if name == "lm_head" and getattr(config, "tie_word_embeddings", False) and not dequantize:
            continue  # a quantized copy of a tied head: the shared fp32 tensor belongs to the embeddings
        if not int8_cpu:
            sd[f"{name}.weight"] = dequantize_weight(method, q, s)
    result = model.load_state_dict(sd, strict=False)
    model.tie_weights()
    head = "lm_head.weight" if getattr(model.config, "tie_word_embeddings", False) else None
    replaced = {f"{n}.weight" for n in names} if int8_cpu else set()
    missing = [k for k in result.missing_keys if k != head and k not in replaced]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise HomeforgeError(f"{p}/model.safetensors does not match its config ({len(missing)} missing, "
                             f"{len(result.unexpected_keys)} unexpected tensors, e.g. {bad})", where=str(p),
                             fix="the directory is damaged; re-run `homeforge compress`")
    model.eval()
    if dequantize:
        return model
    if method == "int8-dynamic" and not use_cuda:
        model = to_dynamic_int8(model, {n: qtensors[n] for n in names})
    elif method == "int8-block" and not use_cuda:
        from homeforge.models.q8 import to_q8

        model = to_q8(model, {n: qtensors[n] for n in names})
    elif use_cuda and method == "int8-block":
        model = model.to(device)  # no CUDA kernel for this layout here: the dequantized weights run in fp32
    elif use_cuda:
        model = model.to(device)
        _torchao_quantize(model, method, qinfo.get("group_size") or 64)
    return model


class Int8Linear(QuantizedLinear):
    """A Linear on int8 weights (one scale per output channel) and int8 activations with one scale
    per row (per token), computed at every call; int32 accumulation (``torch._int_mm``).

    Per-row activation scales are what keep LLMs intact: a few tokens (the first one, some
    punctuation) carry activations 100x larger than the rest, and the one scale per tensor of
    ``torch.ao``'s dynamic Linear then leaves every other token with a handful of levels
    (SmolLM2-135M: top-1 agreement with fp32 0.48, perplexity +200%).

    The weight is kept as stored, ``[N, K]`` (each output's inputs contiguous), and handed to
    ``_int_mm`` as a transposed view. oneDNN's kernel for that layout streams the weight
    faster than for a ``[K, N]`` copy: all of SmolLM2-135M's int8 matrices plus its head
    (134 MB) took 9.9 ms against 14.3 ms at one row, 13.4 against 16.5 ms at 4 and 15.8
    against 20.0 ms at 16 (medians of 9 interleaved rounds, 2 threads, Xeon with VNNI). The
    int32 sums are exact either way, so outputs are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        s = x2.abs().amax(-1, keepdim=True).clamp_(min=1e-8) / 127.0
        xq = torch.round(x2 / s).clamp_(-127, 127).to(torch.int8)
        y = _int_mm(xq, self.qweight.t()).float().mul_(s).mul_(self.scales)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8 per row"


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32, with torch's kernel where this build has one."""
    try:
        return torch._int_mm(a, b)
    except (RuntimeError, AttributeError):  # no int8 kernel for this shape/build: exact int32 math in fp64
        return (a.double() @ b.double()).to(torch.int32)


def to_dynamic_int8(model, qtensors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Swap the named Linear layers for :class:`Int8Linear` (int8 weights and per-row int8 activations).

    With ``qtensors`` the stored int8 weights and scales are used exactly; without, the
    current fp32 weights are quantized per channel.
    """
    modules = dict(model.named_modules())
    names = list(qtensors) if qtensors is not None else quantizable_linears(model)
    for name in names:
        lin = modules[name]
        q, s = qtensors[name] if qtensors is not None else quantize_int8(lin.weight)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, Int8Linear(q, s, lin.bias))
    return model


def skip_init():
    """transformers' no_init_weights (skips random init; buffers are still computed), if available."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def _torchao_quantize(model, method: str, group_size: int) -> None:
    """GPU path: torchao kernels (optional dependency `homeforge[gpu]`)."""
    try:
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        warnings.warn("torchao is not installed: running the dequantized weights in full precision "
                      "(pip install 'homeforge[gpu]' for the int8/int4 GPU kernels)", stacklevel=2)
        return
    cfg = {"int8-dynamic": Int8DynamicActivationInt8WeightConfig(), "int8-weight-only": Int8WeightOnlyConfig(),
           "int4-weight-only": Int4WeightOnlyConfig(group_size=group_size)}[method]
    names = set(quantizable_linears(model))
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in names)
