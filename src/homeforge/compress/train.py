"""Short training loops of the compression methods: QAT (fake-quantized int8 weights and
activations, straight-through gradients) and knowledge distillation."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from homeforge.compress.quantize import quantizable_linears


def token_stream(texts: list[str], tok, max_tokens: int = 2_000_000) -> np.ndarray:
    """Documents tokenized with the model's tokenizer, each followed by EOS, concatenated."""
    out: list[int] = []
    eos = tok.eos_token_id
    for t in texts:
        out += tok(t, add_special_tokens=False)["input_ids"] + [eos]
        if len(out) >= max_tokens:
            break
    return np.asarray(out[:max_tokens], dtype=np.int64)


def _batches(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
    from homeforge.train.data import PackedWindows

    win = PackedWindows(tokens, seq_len, seed=seed, shuffle=True)
    if len(win) == 0:
        raise ValueError(f"the training split has fewer than {seq_len + 1} tokens")
    k = 0
    while True:
        yield win.batch(k, batch_size)
        k += batch_size


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


class _STERound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8, as stored by int8-dynamic (gradient passes straight through)."""
    s = (w.detach().abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.clamp(_STERound.apply(w / s), -127, 127) * s


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric per-tensor uint8 with a range taken from the batch, as fbgemm's dynamic Linear does."""
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    s = ((hi - lo) / 255.0).clamp(min=1e-12)
    zp = torch.round(-lo / s)
    return (torch.clamp(_STERound.apply(x / s) + zp, 0, 255) - zp) * s


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return F.linear(fake_quant_activation(x), fake_quant_weight(self.linear.weight), self.linear.bias)


def _swap(model, names, wrap: bool) -> None:
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        cur = getattr(parent, child)
        setattr(parent, child, FakeQuantLinear(cur) if wrap else cur.linear)


def qat(model, tokens: np.ndarray, steps: int, lr: float, seq_len: int, batch_size: int, seed: int = 0,
        progress: Callable[[int, float], None] | None = None, include_head: bool = False) -> list[float]:
    """Fine-tune ``model`` in place with fake-quantized Linear layers; returns the losses."""
    names = quantizable_linears(model, include_head)
    _swap(model, names, wrap=True)
    losses = _train(model, tokens, steps, lr, seq_len, batch_size, seed, progress,
                    lambda x, y: F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten()))
    _swap(model, names, wrap=False)
    model.eval()
    return losses


def distill(teacher, student, tokens: np.ndarray, steps: int, lr: float, seq_len: int, batch_size: int,
            alpha: float, temperature: float, seed: int = 0,
            progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``student`` on alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""
    teacher.eval()
    T = temperature

    def loss_fn(x, y):
        s_logits = student(input_ids=x).logits.float()
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits.float()
        v = min(s_logits.size(-1), t_logits.size(-1))
        kl = F.kl_div(F.log_softmax(s_logits[..., :v] / T, -1).flatten(0, 1),
                      F.log_softmax(t_logits[..., :v] / T, -1).flatten(0, 1), log_target=True,
                      reduction="batchmean") * T * T
        ce = F.cross_entropy(s_logits.flatten(0, 1), y.flatten())
        return alpha * kl + (1 - alpha) * ce

    losses = _train(student, tokens, steps, lr, seq_len, batch_size, seed, progress, loss_fn)
    student.eval()
    return losses


def _train(model, tokens, steps, lr, seq_len, batch_size, seed, progress, loss_fn) -> list[float]:
    torch.manual_seed(seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    losses = []
    batches = _batches(tokens, seq_len, batch_size, seed)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, warmup)
        x, y = next(batches)
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress:
            progress(step, losses[-1])
    return losses
