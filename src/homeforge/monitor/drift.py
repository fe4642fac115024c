"""Drift statistics: population stability index, Jensen-Shannon divergence, MMD, latency quantiles.

Token distributions are compared over *bins* of the vocabulary, not token by token: the
tokens are ranked by their training frequency and cut into ``n_bins`` groups of about equal
training mass. A few hundred traffic tokens then estimate every bin's share well enough
that identical distributions give PSI ~ 0, while a new vocabulary (another domain, another
language) moves mass into the rare bins and the PSI far above 0.25.
"""

from __future__ import annotations

import math
import re

import numpy as np

EPS = 1e-4
REFUSAL = re.compile(r"\b(I can(?:no|')t|I cannot|I'm sorry|I am sorry|I'm unable|I am unable|as an AI)\b|无法|抱歉|对不起",
                     re.I)


def token_bins(train_counts: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Bin of every token id: tokens by descending training frequency, cut at equal cumulative mass."""
    order = np.argsort(-train_counts, kind="stable")
    mass = np.cumsum(train_counts[order]) / max(1, train_counts.sum())
    bins = np.empty(len(train_counts), dtype=np.int64)
    bins[order] = np.minimum((mass * n_bins).astype(np.int64), n_bins - 1)
    return bins


def binned(counts: np.ndarray, bins: np.ndarray, n_bins: int) -> np.ndarray:
    """Probability per bin (smoothed by EPS so that logs are finite)."""
    b = np.bincount(bins, weights=counts.astype(np.float64), minlength=n_bins)[:n_bins]
    p = b / max(b.sum(), 1.0)
    p = np.maximum(p, EPS)
    return p / p.sum()


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index sum (a - e) ln(a / e) (0 = same; > 0.1 some, > 0.25 a large shift)."""
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def js(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same, 1 = disjoint)."""
    m = (p + q) / 2
    return float(0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m)))


def mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared maximum mean discrepancy with an RBF kernel (bandwidth: the median distance)."""
    z = np.concatenate([x, y]).astype(np.float64)
    d2 = np.maximum((z * z).sum(1)[:, None] + (z * z).sum(1)[None, :] - 2 * z @ z.T, 0)
    med = np.median(d2[np.triu_indices(len(z), 1)]) if len(z) > 1 else 1.0
    k = np.exp(-d2 / max(med, 1e-12))
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        return float("nan")
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def quantile(values: list[float], q: float) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.quantile(v, q)) if v else None


def refusal_rate(texts: list[str]) -> float | None:
    return sum(1 for t in texts if REFUSAL.search(t or "")) / len(texts) if texts else None
