"""Token-level cross-entropy / perplexity of a causal LM, and a unigram baseline."""

from __future__ import annotations

import math

import numpy as np


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of an add-one-smoothed unigram model fit on ``train_tokens``."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(eval_tokens, dtype=np.int64)].mean())


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
