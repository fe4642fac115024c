"""int8-block (models/q8.py): the compiled kernel against the same arithmetic in torch."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from homeforge.models import q8


def kernel_or_skip():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build must fail here, not fall back quietly
        fn = q8.kernel()
    if fn is None:
        pytest.skip("no AVX-512 VNNI on this CPU: the torch path runs (tested below)")
    return fn


@pytest.mark.parametrize("m,k,n", [(1, 576, 576), (3, 64, 7), (7, 1536, 192), (16, 96, 33)])
def test_kernel_block_sums_are_exact(m, k, n):
    """Integer inputs whose blocks all peak at 127 get scale 1: every output is an exact integer
    sum, which the kernel must hit exactly (any lost or doubled block shows)."""
    fn = kernel_or_skip()
    g = torch.Generator().manual_seed(m * n)
    x = torch.randint(-127, 128, (m, k), generator=g).float()
    w = torch.randint(-127, 128, (n, k), generator=g).float()
    x.view(m, -1, 32)[..., 0] = 127.0
    w.view(n, -1, 32)[..., 5] = -127.0
    q, s = q8.quantize_q8(w)
    assert torch.equal(s, torch.ones_like(s)) and torch.equal(q.float(), w)
    want = (x.double() @ w.double().t()).float()
    assert torch.equal(fn(x, q, s), want)
    assert torch.equal(q8.q8_matmul_reference(x, q, s), want)


def test_kernel_matches_the_torch_arithmetic_and_rows_do_not_mix():
    fn = kernel_or_skip()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 320, generator=g) * torch.logspace(-3, 2, 320)  # outlier channels, as in LLMs
    x[2] = 0.0  # an all-zero row: scale 0, output 0
    w = torch.randn(75, 320, generator=g)
    q, s = q8.quantize_q8(w)
    got, want = fn(x, q, s), q8.q8_matmul_reference(x, q, s)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(got[2], torch.zeros(75))
    for rows in (slice(0, 1), slice(4, 5), slice(3, 7)):  # a row's result does not depend on its batch
        assert torch.equal(fn(x[rows], q, s), got[rows])


def test_q8linear_is_close_to_the_fp32_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    layer = q8.Q8Linear(*q8.quantize_q8(lin.weight), lin.bias)
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        want, got = lin(x), layer(x)
    assert got.shape == want.shape
    assert float((got - want).norm() / want.norm()) < 0.01  # 8-bit blocks on both sides: ~0.5% error


def test_torch_path_when_the_kernel_is_switched_off():
    """HOMEFORGE_Q8_KERNEL=0 (and CPUs without VNNI) run the same products as one fp32 GEMM on the
    dequantized weight: equal to the reference up to the rounding of the sums, no build attempted."""
    code = ("import torch\nfrom homeforge.models import q8\nassert q8.kernel() is None\n"
            "torch.manual_seed(0); w = torch.randn(40, 64); x = torch.randn(3, 64) * torch.logspace(-2, 2, 64)\n"
            "layer = q8.Q8Linear(*q8.quantize_q8(w), None)\n"
            "y, r = layer(x), q8.q8_matmul_reference(x, layer.qweight, layer.scales)\n"
            "assert torch.allclose(y, r, rtol=1e-5, atol=1e-5 * float(r.abs().max())), (y - r).abs().max()\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**__import__("os").environ, "HOMEFORGE_Q8_KERNEL": "0"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_widths_not_divisible_by_32_are_refused_with_a_fix():
    from homeforge.errors import HomeforgeError

    with pytest.raises(HomeforgeError, match="divisible by 32") as e:
        q8.quantize_q8(torch.randn(8, 40))
    assert e.value.fix
