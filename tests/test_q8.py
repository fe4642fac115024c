"""int8-block (models/q8.py): the compiled kernel against the same arithmetic in torch."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from homeforge.models import q8


def kernel_or_skip():
    if not q8.cpu_has_vnni():
        pytest.skip("no AVX-512 VNNI on this CPU: the torch path runs (tested below)")
    if os.environ.get("HOMEFORGE_Q8_KERNEL") == "0":
        pytest.skip("HOMEFORGE_Q8_KERNEL=0: the kernel is switched off")
    q8._KERNEL = None  # an earlier failed build (in another test) must fail here, not skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn = q8.kernel()
    assert fn is not None
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


@pytest.mark.parametrize("k", [320, 352, 96])  # 10 blocks; 11 and 3 (an odd last block, loaded half-masked)
def test_kernel_matches_the_torch_arithmetic_and_rows_do_not_mix(k):
    fn = kernel_or_skip()
    g = torch.Generator().manual_seed(k)
    x = torch.randn(9, k, generator=g) * torch.logspace(-3, 2, k)  # outlier channels, as in LLMs
    x[2] = 0.0  # an all-zero row: scale 0, output 0
    w = torch.randn(75, k, generator=g) * torch.logspace(1, -1, k)  # every block its own scale
    q, s = q8.quantize_q8(w)
    got, want = fn(x, q, s), q8.q8_matmul_reference(x, q, s)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(got[2], torch.zeros(75))
    for rows in (slice(0, 1), slice(4, 5), slice(3, 7)):  # a row's result does not depend on its batch
        assert torch.equal(fn(x[rows], q, s), got[rows])


def test_kernel_quantizes_activations_exactly_as_torch():
    """Half-way values (x / scale = n + 0.5) round to even, as torch.round does: with the weight
    127 * identity each output is 127 * xq * xs, so the kernel's xq shows exactly."""
    fn = kernel_or_skip()
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] * 4 + [63.5, -0.0, 126.5, -126.5] * 8])
    w = torch.eye(64) * 127
    q, s = q8.quantize_q8(w)
    xq, xs = q8._quantize_blocks(x)
    want = (127 * xq.float() * xs.repeat_interleave(32, 1)).float()
    assert torch.equal(fn(x, q, s), want)
    assert xq[0, 1].item() == 0 and xq[0, 2].item() == 2 and xq[0, 3].item() == 2  # half to even


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


def test_widths_not_divisible_by_32_and_foreign_weights_are_refused_with_a_fix():
    from homeforge.errors import HomeforgeError

    with pytest.raises(HomeforgeError, match="divisible by 32") as e:
        q8.quantize_q8(torch.randn(8, 40), "model.layers.0.mlp.down_proj")
    assert "keep_fp32=[model.layers.0.mlp.down_proj]" in e.value.fix
    q = torch.zeros(4, 64, dtype=torch.int8)
    q[1, 3] = -128  # the kernel negates weights: -(-128) does not fit in int8
    with pytest.raises(HomeforgeError, match=r"\[-127, 127\]"):
        q8.Q8Linear(q, torch.ones(4, 2), None)
    with pytest.raises(HomeforgeError, match="scales"):
        q8.Q8Linear(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4), None)
