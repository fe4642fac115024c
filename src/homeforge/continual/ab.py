"""`homeforge ab report`: is the candidate arm of a live A/B test better than the champion arm?

From the feedback log (every exchange carries its arm, every rating is joined to its
exchange): per arm the count and mean of a metric (``rating``; or ``latency_ms``,
``completion_tokens``, ``corrected`` = share of answers users corrected), then

- **paired** when enough prompts were answered by both arms (the same prompt text):
  per-prompt means, paired bootstrap (``evaluate.metrics.paired_bootstrap``);
- **unpaired** otherwise: a two-sided permutation test of the difference of means (and
  Welch's t for reference).

The candidate wins when it is better in the metric's direction with p < ``alpha``.
Promotion is the registry's (``Registry.promote`` and its gate on the offline evaluation);
``ab report --promote NAME`` only asks for it when the A/B test is significant.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from homeforge.errors import HomeforgeError

METRICS = {"rating": True, "latency_ms": False, "completion_tokens": None, "corrected": False}  # higher is better?


def value(ex: dict, metric: str) -> float | None:
    if metric == "corrected":
        return 1.0 if ex.get("correction") else 0.0
    v = ex.get(metric)
    return float(v) if isinstance(v, (int, float)) else None


def permutation_test(a: np.ndarray, b: np.ndarray, n: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of mean(b) - mean(a) under exchangeability of the labels."""
    obs = abs(b.mean() - a.mean())
    pooled = np.concatenate([a, b])
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n):
        rng.shuffle(pooled)
        hits += abs(pooled[len(a):].mean() - pooled[:len(a)].mean()) >= obs - 1e-12
    return (hits + 1) / (n + 1)


def welch_t(a: np.ndarray, b: np.ndarray) -> float | None:
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    return float((b.mean() - a.mean()) / math.sqrt(va + vb)) if va + vb > 0 else None


def _key(ex: dict) -> str:
    return str(ex.get("messages") or ex.get("prompt") or "")


def report(feedback: Path, metric: str = "rating", alpha: float = 0.01, paired: str = "auto",
           min_pairs: int = 10) -> dict:
    from homeforge.continual.feedback import joined

    if metric not in METRICS:
        raise HomeforgeError(f"unknown A/B metric {metric!r}", fix=f"choose one of: {', '.join(METRICS)}")
    if paired not in ("auto", "yes", "no"):
        raise HomeforgeError(f"--paired must be auto, yes or no, got {paired!r}", where="--paired",
                             fix="auto (paired when enough prompts got both arms), yes or no")
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for ex in joined(feedback):
        if ex.get("arm") in ("champion", "candidate") and value(ex, metric) is not None:
            by_arm[ex["arm"]].append(ex)
    if len(by_arm["champion"]) < 2 or len(by_arm["candidate"]) < 2:
        raise HomeforgeError(f"the feedback log has {len(by_arm['champion'])} champion and "
                             f"{len(by_arm['candidate'])} candidate exchanges with a {metric}: too few to compare",
                             where=str(feedback), fix="serve with ab.candidate set and feedback.enabled=true until "
                                                      "both arms have results (ratings: POST /v1/feedback)")
    a = np.array([value(e, metric) for e in by_arm["champion"]])
    b = np.array([value(e, metric) for e in by_arm["candidate"]])
    res = {"metric": metric, "alpha": alpha, "higher_is_better": METRICS[metric],
           "arms": {arm: {"n": len(v), "mean": float(np.mean(x))}
                    for arm, v, x in (("champion", by_arm["champion"], a), ("candidate", by_arm["candidate"], b))}}
    pa, pb = defaultdict(list), defaultdict(list)
    for e in by_arm["champion"]:
        pa[_key(e)].append(value(e, metric))
    for e in by_arm["candidate"]:
        pb[_key(e)].append(value(e, metric))
    shared = sorted(set(pa) & set(pb))
    use_paired = paired == "yes" or (paired == "auto" and len(shared) >= min_pairs)
    if use_paired:
        if len(shared) < 2:
            raise HomeforgeError(f"only {len(shared)} prompts were answered by both arms: no paired test",
                                 fix="use --paired no (an unpaired test)")
        from homeforge.evaluate.metrics import paired_bootstrap

        t = paired_bootstrap([float(np.mean(pa[k])) for k in shared], [float(np.mean(pb[k])) for k in shared])
        res.update(test="paired bootstrap", pairs=len(shared), delta=t["delta"], p_value=t["p_value"], ci95=t["ci95"])
    else:
        res.update(test="permutation (unpaired)", delta=float(b.mean() - a.mean()), p_value=permutation_test(a, b),
                   welch_t=welch_t(a, b), pairs=len(shared))
    better = METRICS[metric]
    if better is None:
        res["verdict"] = "no direction for this metric: report only"
        res["candidate_better"] = False
    else:
        good = res["delta"] > 0 if better else res["delta"] < 0
        res["candidate_better"] = bool(good and res["p_value"] < alpha)
        res["verdict"] = (f"candidate better (p={res['p_value']:.3g} < {alpha})" if res["candidate_better"] else
                          f"no significant improvement (delta {res['delta']:+.4g}, p={res['p_value']:.3g}, "
                          f"needs p < {alpha} in the {'higher' if better else 'lower'}-is-better direction)")
    from homeforge.security.audit import AuditLog

    AuditLog().append({"event": "ab-report", "feedback": str(feedback), "metric": metric, "test": res["test"],
                       "delta": res["delta"], "p_value": res["p_value"], "candidate_better": res["candidate_better"],
                       "n": {k: v["n"] for k, v in res["arms"].items()}})
    return res
