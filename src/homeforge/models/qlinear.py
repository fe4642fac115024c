"""The base of homeforge's CPU int8 Linear layers (``quantized.Int8Linear``, ``q8.Q8Linear``).

Its own module so that both layer modules can import it without importing each other."""

from __future__ import annotations

import torch
from torch import nn


class QuantizedLinear(nn.Module):
    """What the CPU int8 layers share: int8 weights ``[N, K]`` as stored, fp32 scales, an optional fp32 bias."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scales", scales.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
