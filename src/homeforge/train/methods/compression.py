"""Training tasks of `homeforge compress`: quantization-aware training and distillation.

Both run on the one training engine (``train.loop.train_task``): the same optimizer, schedule,
clipping, logging, seeding and progress as `homeforge train`. The trained model stays in
memory (``save_final=None``); `compress` writes it in its own storage format.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from homeforge.config import (
    CheckpointConfig,
    OptimConfig,
    ScheduleConfig,
    TrackingConfig,
    TrainConfig,
)
from homeforge.train.data import WindowSource
from homeforge.train.task import StepLoss, TrainTask

# --------------------------------------------------------------------------- fake quantization (QAT)


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

    @property
    def weight(self) -> nn.Parameter:  # what code that inspects a Linear (FLOPs, tied heads) looks for
        return self.linear.weight

    def forward(self, x):
        return F.linear(fake_quant_activation(x), fake_quant_weight(self.linear.weight), self.linear.bias)


def swap_fake_quant(model, names: list[str], wrap: bool) -> None:
    """Wrap the Linear layers ``names`` in ``FakeQuantLinear`` (``wrap``) or unwrap them again."""
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        cur = getattr(parent, child)
        setattr(parent, child, FakeQuantLinear(cur) if wrap else cur.linear)


# --------------------------------------------------------------------------- tasks


def token_stream(texts: list[str], tok, max_tokens: int = 2_000_000) -> np.ndarray:
    """Documents tokenized with the model's tokenizer, each followed by EOS, concatenated."""
    out: list[int] = []
    eos = tok.eos_token_id
    for t in texts:
        out += tok(t, add_special_tokens=False)["input_ids"] + [eos]
        if len(out) >= max_tokens:
            break
    return np.asarray(out[:max_tokens], dtype=np.int64)


def short_run_config(*, steps: int, lr: float, seq_len: int, batch_size: int, seed: int, output_dir: str,
                     threads: int | None = None) -> TrainConfig:
    """The engine's settings for a short fine-tuning run inside `compress` (AdamW, cosine, no eval)."""
    return TrainConfig(max_steps=steps, seq_len=seq_len, micro_batch_size=batch_size, seed=seed, threads=threads,
                       optim=OptimConfig(lr=lr, weight_decay=0.01), log_every=1, output_dir=output_dir,
                       schedule=ScheduleConfig(warmup_steps=max(1, steps // 20)), precision="fp32",
                       checkpoint=CheckpointConfig(every=0, best=False), tracking=TrackingConfig(tensorboard=False),
                       encrypt=False)


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def qat_task(model, tokens: np.ndarray, cfg: TrainConfig, names: list[str]) -> TrainTask:
    """Fine-tune ``model`` with the Linear layers ``names`` fake-quantized (wrapped in place;
    unwrap with ``swap_fake_quant(model, names, wrap=False)`` after training)."""
    swap_fake_quant(model, names, wrap=True)

    def loss_fn(m, batch) -> StepLoss:
        return StepLoss(_lm_loss(m(input_ids=batch["input_ids"]).logits, batch["labels"]), batch["labels"].numel())

    return TrainTask(model=model, train=WindowSource(tokens, cfg.seq_len, seed=cfg.seed), val=None,
                     loss_fn=loss_fn, save_final=None, info={"method": "qat", "quantized_linears": len(names)})


def distill_task(teacher, student, tokens: np.ndarray, cfg: TrainConfig, alpha: float, temperature: float) -> TrainTask:
    """Train ``student`` on alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE (summed per token)."""
    teacher.eval()
    t = temperature

    def loss_fn(m, batch) -> StepLoss:
        x, y = batch["input_ids"], batch["labels"]
        s_logits = m(input_ids=x).logits.float()
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits.float()
        v = min(s_logits.size(-1), t_logits.size(-1))
        kl = F.kl_div(F.log_softmax(s_logits[..., :v] / t, -1).flatten(0, 1),
                      F.log_softmax(t_logits[..., :v] / t, -1).flatten(0, 1), log_target=True,
                      reduction="sum") * t * t
        return StepLoss(alpha * kl + (1 - alpha) * _lm_loss(s_logits, y), y.numel())

    return TrainTask(model=student, train=WindowSource(tokens, cfg.seq_len, seed=cfg.seed), val=None,
                     loss_fn=loss_fn, save_final=None,
                     info={"method": "distill", "alpha": alpha, "temperature": temperature})
