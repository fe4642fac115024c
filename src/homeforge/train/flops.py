"""FLOPs per token and the machine's measured peak, for MFU (model FLOPs utilisation).

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per trained token follow the
PaLM / nanoGPT convention: ``6 N + 12 L d T`` (N = parameters doing matmuls, i.e.
without the input embedding lookup; L layers, d hidden size, T sequence length for
attention scores). With frozen parameters (LoRA) a frozen matmul costs 4 FLOPs per
parameter (forward + input gradient), a trained one 6.

The peak is *measured*, not a datasheet figure: a large square matmul in the training
dtype on the training device, timed a few times, the best kept. It is cached per
(device, dtype, threads) in ``$HOMEFORGE_CACHE`` (default ``~/.cache/homeforge``), or
given with ``train.peak_tflops``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from homeforge import paths
from homeforge._fs import atomic_write_text


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts that take part in matmuls (no embedding lookups)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied_head = out_emb is not None and id(out_emb.weight) in embeddings
    trainable = frozen = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embeddings and not (tied_head and p is out_emb.weight):
            continue
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def flops_per_token(model: torch.nn.Module, seq_len: int, frozen_backward: bool = True) -> float:
    """Training FLOPs (forward + backward) per token of ``model`` at sequence length ``seq_len``.

    A trainable weight costs 6 FLOPs per token (forward, input and weight gradients), a frozen one
    4 when gradients flow back through it (LoRA: adapters sit in every layer) and 2 when they do
    not (``frozen_backward=False``: a frozen base under a trained head). Attention scores add
    12 * layers * hidden * seq_len (6 when nothing below the head is trained)."""
    trainable, frozen = matmul_params(model)
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    hidden = getattr(cfg, "hidden_size", 0) or 0
    per_frozen, attention = (4.0, 12.0) if frozen_backward else (2.0, 4.0)
    return 6.0 * trainable + per_frozen * frozen + attention * layers * hidden * seq_len


def _cache_file() -> Path:
    root = paths.cache_dir()
    return root / "peak_flops.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def probe_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5) -> float:
    """Best FLOP/s of an ``n x n`` matmul in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _cache_key(device: torch.device, dtype: torch.dtype) -> str:
    return f"{device.type}|{_device_name(device)}|{dtype}|threads={torch.get_num_threads()}"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _store(key: str, value: float) -> None:
    cache = _read_cache()
    cache[key] = value
    try:
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_cache_file(), json.dumps(cache, indent=1))
    except OSError:
        pass  # an unwritable cache only costs a re-measure next time


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, given_tflops: float | None = None) -> float:
    """Peak FLOP/s per process: given, else cached, else measured once and cached."""
    if given_tflops:
        return given_tflops * 1e12
    key = _cache_key(device, dtype)
    cached = _read_cache().get(key)
    if cached is not None:
        return float(cached)
    value = probe_peak_flops(device, dtype, n=2048)
    _store(key, value)
    return value


def refresh_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Measure again and keep the higher figure: a peak probed on a busy machine is too low, and
    made MFU exceed 100% once the machine was quiet."""
    key = _cache_key(device, dtype)
    value = max(probe_peak_flops(device, dtype, n=2048), float(_read_cache().get(key) or 0.0))
    _store(key, value)
    return value
