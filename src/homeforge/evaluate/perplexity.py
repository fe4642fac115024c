"""Token-level cross-entropy / perplexity of a causal LM, and a unigram baseline."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def mean_loss(model, windows, batch_size: int = 8, max_batches: int | None = None) -> tuple[float, int]:
    """Mean next-token NLL (nats) over ``windows`` (a PackedWindows), and the token count."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in windows.sequential(batch_size, max_batches):
        logits = model(input_ids=x.to(device)).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.to(device).reshape(-1), reduction="sum")
        total += loss.item()
        count += y.numel()
    if was_training:
        model.train()
    return (total / count if count else float("nan")), count


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of an add-one-smoothed unigram model fit on ``train_tokens``."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(eval_tokens, dtype=np.int64)].mean())


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
