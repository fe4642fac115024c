"""int8-block: llama.cpp's q8_0 arithmetic — int8 weights and int8 activations, one scale per 32 inputs.

``int8-dynamic`` (``Int8Linear``) has one weight scale per output channel and one activation
scale per token. That is cheap (one ``torch._int_mm``), but a token's few large channels
squeeze the rest into a handful of levels, so on SmolLM2-135M the head and the down
projections have to stay fp32 to keep quality. Here every block of 32 input values has its
own scale, on both sides, as in llama.cpp's q8_0. Measured on SmolLM2-135M (next-token argmax
agreement with fp32 on 8,192 tokens of stdlib docstrings, every Linear and the head
quantized): per-channel weights and per-token activations 0.880; per-channel weights and
32-value activation blocks 0.945; 32-value blocks on both sides 0.960.

The block sums need a kernel torch does not have: ``q8_kernel.cpp``, built on first use with
``torch.utils.cpp_extension`` (a C++ compiler and ninja) into homeforge's cache directory, for
CPUs with AVX-512 VNNI. Elsewhere, or when the build fails (a warning says why), the same
arithmetic runs in plain torch, several times slower. ``HOMEFORGE_Q8_KERNEL=0`` forces the
torch path.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from homeforge.models.qlinear import QuantizedLinear

BLOCK = 32


def quantize_q8(w: torch.Tensor, name: str = "a Linear") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per block of 32 inputs: (q int8 [N, K] in [-127, 127], scales
    float32 [N, K/32])."""
    w = w.detach().float()
    n, k = w.shape
    if k % BLOCK:
        from homeforge.errors import HomeforgeError

        raise HomeforgeError(f"int8-block needs input widths divisible by {BLOCK}; {name} has {k}",
                             fix=f"use int8-dynamic for this model, or keep {name} fp32 (keep_fp32=[{name}])")
    q, s = _quantize_blocks(w)
    return q, s


def dequantize_q8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.float().view(n, k // BLOCK, BLOCK) * scales.float()[..., None]).view(n, k)


def _quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 32 values: scale = max|x| / 127, q = round(x / scale) (0 where the block is all zero)."""
    rows, k = x.shape
    g = x.reshape(rows, k // BLOCK, BLOCK)
    s = g.abs().amax(-1) / 127.0
    q = torch.where(s[..., None] > 0, torch.round(g / s[..., None]), 0.0).clamp_(-127, 127).to(torch.int8)
    return q.view(rows, k), s.contiguous()


def q8_matmul_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """The kernel's arithmetic in torch: x float32 [M, K] -> float32 [M, N]. The block sums are exact
    (at most 32 * 127 * 127 in magnitude, so exact in fp32 too); they are scaled and summed in fp64."""
    m, k = x.shape
    n, nb = q.shape[0], k // BLOCK
    wq = q.view(n, nb, BLOCK).permute(1, 2, 0).float()  # [nb, 32, N]
    out = torch.empty(m, n)
    for i in range(0, m, rows):  # bounded memory: [nb, rows, N] block sums at a time
        xq, xs = _quantize_blocks(x[i:i + rows].float())
        sums = torch.bmm(xq.view(-1, nb, BLOCK).transpose(0, 1).float(), wq)  # [nb, rows, N]
        out[i:i + rows] = (sums.double() * xs.t().double()[..., None] * scales.t().double()[:, None, :]).sum(0).float()
    return out


def q8_matmul_dequantized(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same products as the kernel as one fp32 GEMM (the path without the kernel): the input's
    32-value blocks quantized and scaled back, times the weight dequantized for this call (the copy
    lives only during the call). Only the rounding of the sums differs from the kernel."""
    xq, xs = _quantize_blocks(x)
    m, k = x.shape
    xd = (xq.view(m, -1, BLOCK).float() * xs[..., None]).view(m, k)
    return torch.nn.functional.linear(xd, dequantize_q8(q, scales))


class Q8Linear(QuantizedLinear):
    """A Linear on int8-block weights (``compress -m int8-block``; ``scales`` is ``[N, K/32]``),
    activations quantized the same way at every call."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        if q.shape[1] % BLOCK or tuple(scales.shape) != (q.shape[0], q.shape[1] // BLOCK) or bool((q == -128).any()):
            from homeforge.errors import HomeforgeError

            raise HomeforgeError(f"int8-block weights must be int8 in [-127, 127] with scales [N, K/{BLOCK}]; got "
                                 f"{tuple(q.shape)} with scales {tuple(scales.shape)}",
                                 fix="re-run `homeforge compress -m int8-block`")
        super().__init__(q, scales, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        fn = kernel()
        y = fn(x2, self.qweight, self.scales) if fn is not None else \
            q8_matmul_dequantized(x2, self.qweight, self.scales)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8 per {BLOCK} inputs"


def to_q8(model, qtensors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Swap the named Linear layers for :class:`Q8Linear` holding the given (q, scales)."""
    modules = dict(model.named_modules())
    for name, (q, s) in qtensors.items():
        lin = modules[name]
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, Q8Linear(q, s, lin.bias))
    return model


# --------------------------------------------------------------------------- the kernel

_KERNEL: object = None  # None: not tried yet; False: unavailable here


def kernel():
    """The compiled ``q8_linear(x, q, scales)``, or None where it is unavailable (then the torch path runs)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build() or False
    return _KERNEL or None


def cpu_has_vnni() -> bool:
    """AVX-512 F/BW/DQ/VL and VNNI, which the kernel is compiled for (Linux: /proc/cpuinfo)."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    have = set(flags.split())
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"} <= have


def _build():
    if os.environ.get("HOMEFORGE_Q8_KERNEL", "1") == "0" or not cpu_has_vnni():
        return None
    src = Path(__file__).with_name("q8_kernel.cpp").read_text(encoding="utf-8")
    tag = hashlib.sha256((src + torch.__version__).encode()).hexdigest()[:12]
    try:
        from torch.utils.cpp_extension import load_inline

        from homeforge.paths import cache_dir

        _ninja_on_path()

        build = cache_dir() / "kernels" / f"q8-{tag}"
        build.mkdir(parents=True, exist_ok=True)
        mod = load_inline(name=f"homeforge_q8_{tag}", cpp_sources=[src], functions=["q8_linear"],
                          extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], build_directory=str(build),
                          verbose=False)
        return mod.q8_linear
    except Exception as e:  # no compiler, no ninja, a read-only cache: the torch path computes the same products
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"int8-block: the CPU kernel could not be built ({first[:300]}); running the slower torch "
                      "path (install a C++ compiler and `pip install ninja`, or set HOMEFORGE_Q8_KERNEL=0 to "
                      "silence this)", stacklevel=3)
        return None


def _ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the pip package's binary is there only in an activated venv."""
    import shutil

    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
